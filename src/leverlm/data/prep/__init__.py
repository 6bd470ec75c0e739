"""Raw official files -> collections: ``coco``, ``vqav2``, ``easyvqa`` (``leverlm prep``).

Import the functions from their modules (``leverlm.data.prep.coco.prep_coco`` ...) or from here;
the submodules are light (PIL, numpy and tqdm are imported only when work starts).
"""

from leverlm.data.prep.coco import prep_coco
from leverlm.data.prep.common import PrepError, PrepOptions
from leverlm.data.prep.easyvqa import prep_easyvqa
from leverlm.data.prep.vqav2 import prep_vqav2

__all__ = ["PrepError", "PrepOptions", "prep_coco", "prep_easyvqa", "prep_vqav2"]
