"""The one exception type for mistakes a user can make (bad path, wrong shape, unknown name).

The CLI turns it into a single line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""
