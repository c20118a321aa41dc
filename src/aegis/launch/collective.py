"""The few collectives the launch needs, with a sleeping wait in front of each.

MPICH ranks busy-poll inside blocking collectives; launcher ranks wait seconds to minutes
between ticks next to vLLM processes that need those cores. Each collective therefore first
meets in an Ibarrier tested with short sleeps, so the blocking call that follows is brief.
"""

from __future__ import annotations

import time


class Collective:
    def __init__(self, comm, poll: float = 0.01):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.poll = poll

    def _meet(self) -> None:
        if self.size == 1:
            return
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(self.poll)

    def allgather(self, obj):
        self._meet()
        return self.comm.allgather(obj)

    def gather(self, obj):
        self._meet()
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        self._meet()
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self._meet()

    def abort(self, code: int) -> None:
        if self.size > 1:
            self.comm.Abort(code)
