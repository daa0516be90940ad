"""The ``run_itNNN_model.star`` of a classification (2D or 3D, VDAM or EM), as RELION writes it.

Class2D, InitialModel and Class3D share every table but the class images' names and a few columns;
this writes the shared ones from the classifier's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files.star import write_star


def write_class_model(path: Path, st: Any, *, ndim: int, box: int, pixel_size: float, pad: float,
                      current_size: int, tau2_fudge: float, optics: pd.DataFrame, n_particles: int,
                      resolved: list[int], references: list[str], moments: tuple[list[str], list[str]] | None,
                      tau2: np.ndarray, extra_class_columns: dict[str, Any] | None = None) -> None:
    """Write model_general, model_classes, model_class_k, model_groups and model_optics_group_g.

    ``st`` carries the classifier's running state (resolution_shell, sigma_offset, loglik, avg_pmax, pi,
    acc_rot, acc_trans (px), fsc, completeness, sigma2); ``resolved`` is each class's last resolved
    shell, ``references`` its image name, ``moments`` the VDAM moments' names (None for EM) and ``tau2``
    (K, N/2+1) each reference's power per shell.
    """
    k = len(references)
    n_sh = box // 2 + 1
    shells = np.arange(n_sh)
    res_a = np.where(shells > 0, box * pixel_size / np.maximum(shells, 1), 999.0)
    general = {"rlnReferenceDimensionality": ndim, "rlnDataDimensionality": 2, "rlnOriginalImageSize": box,
               "rlnCurrentResolution": box * pixel_size / st.resolution_shell,
               "rlnCurrentImageSize": current_size, "rlnPaddingFactor": pad,
               "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1, "rlnMinRadiusNnInterpolation": 10,
               "rlnPixelSize": pixel_size, "rlnNrClasses": k, "rlnNrBodies": 1, "rlnNrGroups": 1,
               "rlnNrOpticsGroups": len(optics), "rlnTau2FudgeFactor": tau2_fudge,
               "rlnNormCorrectionAverage": 1.0, "rlnSigmaOffsetsAngst": st.sigma_offset * pixel_size,
               "rlnOrientationalPriorMode": 0, "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0,
               "rlnSigmaPriorPsiAngle": 0.0, "rlnLogLikelihood": st.loglik, "rlnAveragePmax": st.avg_pmax}
    ssnr = st.fsc[:, :n_sh] / np.maximum(1 - st.fsc[:, :n_sh], 1e-6)
    classes = pd.DataFrame({
        "rlnReferenceImage": references,
        "rlnClassDistribution": st.pi,
        "rlnAccuracyRotations": st.acc_rot,
        "rlnAccuracyTranslationsAngst": st.acc_trans * pixel_size,
        "rlnEstimatedResolution": np.array([box * pixel_size / r for r in resolved]),
        "rlnOverallFourierCompleteness": np.array([st.completeness[c, 1:r + 1].mean()
                                                   for c, r in enumerate(resolved)]),
        **(extra_class_columns or {}),
    })
    if moments is not None:
        classes.insert(1, "rlnGradMoment1", moments[0])
        classes.insert(2, "rlnGradMoment2", moments[1])
    blocks: dict[str, Any] = {"model_general": general, "model_classes": classes}
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": shells / (box * pixel_size),
            "rlnAngstromResolution": res_a, "rlnSsnrMap": ssnr[c], "rlnGoldStandardFsc": 0.0,
            "rlnFourierCompleteness": st.completeness[c, :n_sh], "rlnReferenceSigma2": 0.0,
            "rlnReferenceTau2": tau2[c], "rlnSpectralOrientabilityContribution": 0.0})
    blocks["model_groups"] = pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupName": ["group_1"],
                                           "rlnGroupNrParticles": [n_particles], "rlnGroupScaleCorrection": [1.0]})
    for g in optics["rlnOpticsGroup"].astype(int):
        blocks[f"model_optics_group_{g}"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": shells / (box * pixel_size), "rlnSigma2Noise": st.sigma2})
    write_star(path, blocks)
