"""Node-local caches, so that nothing two instances write is shared. Pure layout.

Choice: **per instance** for every cache an engine writes while it runs (vLLM's cache root,
Triton, TorchInductor, torch extensions, XDG, Hugging Face modules/xet/assets, and the
platform's own, e.g. MIOpen's database): these caches take no lock (vLLM issue 24601: engines
sharing one compile cache corrupt it), a per-node lock would serialise 12 engines' warm-up,
and the disk they cost is small. **Per node, pre-warmed** for tokenizer vocabularies
(tiktoken): they are fetched once per node by the pre-warm step under a lock, then made
read-only, so instances only read them.

Everything lives under <node_local_dir>/aegis-cache/<job>/, so two jobs on one node (a chained
successor starting beside its predecessor) never share a cache either; the launcher removes
its job's directories when it stops.
"""

from __future__ import annotations

from pathlib import Path

# variable -> directory name under the instance's cache directory
INSTANCE_CACHES = (
    ("VLLM_CACHE_ROOT", "vllm"),
    ("TRITON_CACHE_DIR", "triton"),
    ("TORCHINDUCTOR_CACHE_DIR", "torchinductor"),
    ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
    ("XDG_CACHE_HOME", "xdg"),
    ("HF_MODULES_CACHE", "hf_modules"),  # trust_remote_code writes model code here
    ("HF_XET_CACHE", "hf_xet"),
    ("HF_ASSETS_CACHE", "hf_assets"),
)
# Filled once per node by the pre-warm, then read-only.
NODE_CACHES = (
    ("TIKTOKEN_CACHE_DIR", "tiktoken"),
    ("TIKTOKEN_RS_CACHE_DIR", "tiktoken"),  # openai_harmony (gpt-oss)
)
ALL_VARS = tuple(dict.fromkeys(name for name, _ in INSTANCE_CACHES + NODE_CACHES))


def job_cache_root(node_local_dir: str, job: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in job).strip(".") or "job"
    return Path(node_local_dir) / "aegis-cache" / safe


def node_cache_dir(root: Path) -> Path:
    return root / "node"


def instance_cache_dir(root: Path, part_name: str) -> Path:
    return root / part_name


def node_cache_env(root: Path) -> list[tuple[str, str]]:
    return [(var, str(node_cache_dir(root) / sub)) for var, sub in NODE_CACHES]


def instance_cache_env(root: Path, part_name: str,
                       platform_vars: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The cache variables of one instance process: its own directories, plus the node's
    pre-warmed (read-only) tokenizer caches."""
    mine = instance_cache_dir(root, part_name)
    own = [(var, str(mine / sub)) for var, sub in INSTANCE_CACHES]
    own += [(var, str(mine / var.lower())) for var in platform_vars]
    return own + node_cache_env(root)


def writable_dirs(env: list[tuple[str, str]]) -> list[str]:
    """The directories of `env` an instance may write (the node caches are read-only)."""
    node_vars = {var for var, _ in NODE_CACHES}
    return list(dict.fromkeys(path for var, path in env if var not in node_vars))


# The built-in pre-warm (run by the node's python3 inside the instances' environment).
WARM_TOKENIZERS = """\
import sys
try:
    from transformers import AutoTokenizer
except Exception as e:
    print(f"aegis pre-warm: no transformers here ({type(e).__name__}); nothing to warm")
    sys.exit(0)
for model in sys.argv[1:]:
    try:
        AutoTokenizer.from_pretrained(model)
        print(f"aegis pre-warm: tokenizer of {model} loaded")
    except Exception as e:
        print(f"aegis pre-warm: tokenizer of {model}: {type(e).__name__}: {e}")
if any("gpt-oss" in m for m in sys.argv[1:]):
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
        load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        print("aegis pre-warm: harmony (o200k) vocabulary loaded")
    except Exception as e:
        print(f"aegis pre-warm: harmony vocabulary: {type(e).__name__}: {e}")
"""
