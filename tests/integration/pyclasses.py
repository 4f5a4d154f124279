"""User model classes for the `python` runtime, imported by the test workers."""

from __future__ import annotations



class Picky:
    """Doubles its input, but raises for any batch containing a negative value.

    A batch mixing good and bad rows raises as a whole: exactly the case the worker's
    bisection must untangle.
    """

    def __init__(self, path):
        self.path = path

    def predict(self, inputs):
        (x,) = inputs.values()
        if (x < 0).any():
            raise ValueError("negative input rejected by Picky")
        return {"double": x * 2}
