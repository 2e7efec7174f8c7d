"""The one list of defect classes.

Every other part of the project imports these names: the simulator draws them, the data
contract sizes mask channels with them, the models name output channels after them. Order
matters: it is the channel order of every mask and heat map.
"""

DEFECT_CLASSES = ("vacancy", "substitution", "interstitial")

# Image class of a defect-free crystal; the classifier's labels are BULK_LABEL plus the
# defect classes present in the data.
BULK_LABEL = "bulk"

IMAGE_CLASSES = (BULK_LABEL,) + DEFECT_CLASSES


def class_index(name: str) -> int:
    """Channel index of a defect class, with an error that lists the known classes."""
    try:
        return DEFECT_CLASSES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown defect class {name!r}; known classes: {', '.join(DEFECT_CLASSES)}"
        ) from None
