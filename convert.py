"""python convert.py SRC OUT [...]  ==  kimi-mlx convert SRC OUT [...]"""
from kimi_mlx.cli import main

main("convert", "python convert.py")
