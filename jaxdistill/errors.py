"""The one error class a user can cause.

Anything a user can get wrong (a config key, a file, a shape or vocabulary
mismatch) raises ``JaxdistillError`` with a message that names the key or path
and says how to fix it. The CLI prints it as one ``error: ...`` line and exits 2.
"""


class JaxdistillError(Exception):
  """A user-facing error: bad config, missing file, incompatible inputs."""


class ConfigError(JaxdistillError):
  """A config key has a bad value, a wrong type or contradicts another key."""

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"{key}: {message}")
