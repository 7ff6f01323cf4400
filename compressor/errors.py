"""The errors a user can cause, each with a message that names the problem and the fix.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback."""

from .allocation.lp import InfeasibleBudget
from .arch.families import UnsupportedArchitecture
from .calibration.images import ImageCalibrationError
from .calibration.stats import NonFiniteError
from .config.loader import RecipeError
from .device import DeviceError
from .distributed import NotDistributed, RankFailure
from .io.checkpoint import OutputExists
from .io.models import ModelDirError
from .prune.rule import NothingToPrune
from .upcycle.build import UpcycleError

USER_ERRORS = (
    InfeasibleBudget,
    UnsupportedArchitecture,
    NonFiniteError,
    ImageCalibrationError,
    RecipeError,
    OutputExists,
    ModelDirError,
    FileNotFoundError,
    UpcycleError,
    NothingToPrune,
    DeviceError,
    NotDistributed,
    RankFailure,
)
