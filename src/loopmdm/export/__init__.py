"""Writing runs in other libraries' formats: `hf.py`, a Hugging Face model folder."""
