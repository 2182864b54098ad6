"""Strategy ``xagent_linear``: Ansible's ``linear``, run over Mitogen when it is installed.

Mitogen keeps one Python interpreter per host for the whole run instead of
starting one per task (ssh + python + module zip each time), which roughly
halves a converge that changes nothing (README, "Deploying to real servers"). Without
Mitogen (``pip install mitogen``, in requirements-dev.txt) this is plain
``linear`` and says so once. ``ANSIBLE_STRATEGY=linear`` turns it off.
"""

from __future__ import annotations

from ansible.plugins.loader import strategy_loader
from ansible.utils.display import Display

_linear = strategy_loader.get("linear", class_only=True)

try:
    import ansible_mitogen.loaders  # mitogen's loaders load before its strategy
    import ansible_mitogen.strategy
except ImportError:
    Display().warning(
        "strategy xagent_linear: mitogen is not installed (pip install -r requirements-dev.txt); "
        "running Ansible's linear strategy"
    )

    class StrategyModule(_linear):
        pass

else:

    class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _linear):
        def run(self, iterator, play_context, result=0):
            # Plays on the controller itself (Molecule's create and destroy) gain nothing
            # and lose: Mitogen's async breaks the docker modules' async jobs.
            if iterator._play.connection == "local":
                return _linear.run(self, iterator, play_context)
            return super().run(iterator, play_context, result)
