"""Tasks and episodes."""

from metafn.tasks.episode import Episode, check_episode_batch

__all__ = ["Episode", "check_episode_batch"]
