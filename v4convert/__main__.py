"""``python -m v4convert`` (what ``torchrun -m v4convert run DIR ...`` starts on every rank)."""
from .cli import main

main()
