"""Checkpoints: Hugging Face safetensors loading, conversion to jaxdyn's Orbax format, and the shipped demo model."""

import os

# The shipped demo model lives inside this package (package data), so it is found from an editable install and
# from a wheel alike.
DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
