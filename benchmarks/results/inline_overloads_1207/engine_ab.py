# Bundled bf16 engine, decode ms/step at 1/4/16 rows, the parent commit's host loops and this commit's toggled in one
# process (this directory's toggle.py): ../attention_inlined_1207/engine_ab.py with it. usage: python engine_ab.py ROUNDS
import os
import runpy

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["AB_TOGGLE_DIR"] = HERE
os.environ.setdefault("AB_CASES", "1 row;4 rows;16 rows")
runpy.run_path(os.path.join(HERE, "..", "attention_inlined_1207", "engine_ab.py"), run_name="__main__")
