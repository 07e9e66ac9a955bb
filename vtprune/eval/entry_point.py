"""lmms-eval's ``lmms_eval.models`` entry point, kept apart from the model class.

lmms-eval loads entry points while its ``lmms_eval.models`` package initialises, and the model module imports
lmms-eval: were ``manifest`` defined there, importing vtprune's model first would make lmms-eval read a
half-initialised module and silently drop the ``vtprune`` model.
"""


def manifest():
    """Entry-point payload (``[project.entry-points."lmms_eval.models"] vtprune = ...:manifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtprune", simple_class_path="vtprune.eval.lmms_model.VtpruneLMM")
