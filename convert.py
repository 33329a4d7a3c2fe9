"""python convert.py SRC OUT [...]  ==  kimi-mlx convert SRC OUT [...]"""
import sys

from kimi_mlx.cli import main

sys.argv.insert(1, "convert")
main()
