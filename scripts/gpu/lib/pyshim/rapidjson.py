"""Fallback for python-rapidjson, which tritonclient imports as `json`: used only when the
carried cp312 build does not load (PYTHONPATH puts this folder after .carry's pylib)."""
from json import JSONDecodeError, dumps, loads  # noqa: F401
