"""Library code stays light: training never imports plotting or the analysis package."""

import subprocess
import sys

HEAVY = ("matplotlib", "trl_forking.analysis")


def modules_after(statement: str) -> set[str]:
    """Returns the names in sys.modules after running ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(done.stdout.split())


def test_importing_the_package_and_the_trainer_loads_no_plotting_or_analysis():
    loaded = modules_after(
        "import trl_forking\nfrom trl_forking import ForkingGRPOTrainer, ForkingGRPOConfig, ForkingStatsCallback"
    )
    assert "trl_forking.trainer" in loaded  # the statement did import the trainer
    assert not [name for name in loaded if name.startswith(HEAVY)]
