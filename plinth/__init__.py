"""plinth: pretrain, load, adapt, evaluate and serve foundation models.

    import plinth
    m = plinth.load("smollm2-135m-instruct")
    print(m.chat([{"role": "user", "content": "Hello!"}]))
"""
from plinth.errors import PlinthError
from plinth.loaded import LoadedModel, load

__all__ = ["load", "LoadedModel", "PlinthError"]
__version__ = "0.1.0"
