import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
# project-local cache for DeepSpeed's JIT ops (compiled once, ~80 s)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
