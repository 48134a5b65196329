"""The modelling code of a Hugging Face export: `loopmdm export` copies these files into the
exported folder. They import only torch and transformers, never loopmdm (tests/test_export.py
checks), and loopmdm itself never imports them."""
