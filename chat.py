"""python chat.py [...]  ==  kimi-mlx chat [...]"""
import sys

from kimi_mlx.cli import main

sys.argv.insert(1, "chat")
main()
