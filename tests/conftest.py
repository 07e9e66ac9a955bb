import os
import tempfile

# Tests never touch the network, and build tiny models once into a shared cache for the session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VTPRUNE_CACHE", os.path.join(tempfile.gettempdir(), "vtprune-test-cache"))
