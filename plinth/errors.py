"""The one exception type for mistakes a user can make (bad config, bad file, bad request).

Its message says what is wrong and how to fix it; the CLI prints it without a traceback and
exits with code 2, and the server turns it into a 400.
"""


class PlinthError(Exception):
    """A problem with the user's input, explained in the message."""
