import os
import sys

# The scripts live at the repository root; tests import them as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
