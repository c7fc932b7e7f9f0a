# Puts tools/kernel-sim on the import path: simt.py, the emulator the folders share, lives there.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
