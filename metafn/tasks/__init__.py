"""Tasks and episodes: the ``Episode`` container, toy task families and episode samplers."""

from metafn.tasks.episode import Episode, check_episode_batch
from metafn.tasks.sampling import (
    FAMILIES, SPLITS, family_from_name, sample_episode, sample_episodes, sample_pooled,
    sample_task, task_pool,
)
from metafn.tasks.synthetic import (
    Family, SineFamily, SineTask, Task, Toy2DFamily, Toy2DTask, circles, linear2d, sine, spirals,
    xor,
)

__all__ = [
    "Episode", "check_episode_batch",
    "FAMILIES", "SPLITS", "family_from_name", "sample_episode", "sample_episodes",
    "sample_pooled", "sample_task", "task_pool",
    "Family", "SineFamily", "SineTask", "Task", "Toy2DFamily", "Toy2DTask",
    "sine", "linear2d", "xor", "circles", "spirals",
]
