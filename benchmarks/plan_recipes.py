"""Write each recipes/plans/*.yaml's plan comment: its plan on the model's real config (tests/model_configs). tests/test_plan.py checks them."""
import re, sys
from pathlib import Path
from finetune import launch
from finetune.training import stage_plan
from finetune.config.parsing import load_recipe
from finetune.modeling.memory_plan import GiB, ROWS
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_plan import PLANNED_RECIPES
for name, (config, gpus, accelerate) in PLANNED_RECIPES.items():
    path = ROOT / "recipes" / "plans" / f"{name}.yaml"
    recipe = load_recipe(str(path), [f"model.name_or_path={ROOT}/tests/model_configs/{config}"])
    target = stage_plan.make_target(recipe, gpus=gpus, layout=launch.layout_of(accelerate) if accelerate else None)
    plans = stage_plan.plan_recipe(recipe, target)
    command = f"moetune plan recipes/plans/{name}.yaml --gpus {gpus}" + (f" --accelerate {accelerate}" if accelerate else "")
    lines = [f"# Plan (`{command}`; the model's real config.json, tests/model_configs/{config}), GiB per GPU:"]
    for plan in plans:
        rows = ", ".join(f"{row} {plan.rows[row] / GiB:.1f}" for row in ROWS)
        verdict = "fits" if plan.fits else f"does not fit; {plan.change}"
        lines.append(f"#   {plan.stage}: {rows}; total {plan.total / GiB:.1f} of {plan.memory / GiB:.1f}: {verdict}")
    text = path.read_text()
    text = re.sub(r"# (PLAN|Plan \(`moetune plan).*?\n(?=run_dir:)", "\n".join(lines) + "\n", text, flags=re.S)
    path.write_text(text)
    print("\n".join(lines))
