"""The tutorial's size targets, measured: lines of grpo_speech.py in all and in Parts I + II
(what a student reads), the longest function bodies (docstring excluded), and README.md.

    python docs/line_counts.py
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
source = (ROOT / "grpo_speech.py").read_text()
lines = source.splitlines()
part3 = next(i for i, line in enumerate(lines, start=1) if line.startswith("# Part III"))
print(f"grpo_speech.py: {len(lines)} lines; Parts I + II: {part3 - 2} lines (Part III from line {part3})")

bodies = []
for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        first = node.body[0]
        has_docstring = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
        start = (node.body[1] if has_docstring and len(node.body) > 1 else first).lineno
        bodies.append((node.end_lineno - start + 1, node.name, node.lineno))
print("longest function bodies:", ", ".join(f"{name} {n} (line {at})" for n, name, at in sorted(bodies)[::-1][:5]))
train = next(b for b in bodies if b[1] == "train")
print(f"training loop (train): {train[0]} lines of body")
print(f"README.md: {len((ROOT / 'README.md').read_text().splitlines())} lines")
