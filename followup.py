"""Guideline follow-up category for a lung nodule of a given diameter: the size part of the answer.

One table, :data:`RULES`, maps (guideline, nodule type, patient risk, single or multiple nodules,
diameter in mm) to a category and a short recommendation written in our own words. Sources:

* Fleischner Society 2017: H. MacMahon, D. P. Naidich, J. M. Goo et al., "Guidelines for Management of
  Incidental Pulmonary Nodules Detected on CT Images: From the Fleischner Society 2017", Radiology
  284(1):228-243, 2017. For incidental nodules in adults aged 35 or more; not for lung cancer screening,
  immunocompromised patients or patients with a known cancer.
* Lung-RADS v2022, American College of Radiology (Lung CT Screening Reporting & Data System, released
  November 2022). For lung cancer screening with low-dose CT (LDCT); here only the size rules of a
  baseline scan (no prior scan, so nothing is "new" or "growing").

Size bands are applied exactly as the guidelines write them, to the diameter as given (never rounded):

* Fleischner solid: "<6 mm" is d < 6, "6-8 mm" is 6 <= d <= 8, ">8 mm" is d > 8 (so 5.9 -> <6,
  6.0 -> 6-8, 8.0 -> 6-8, 8.1 -> >8). Subsolid: "<6 mm" and ">=6 mm".
* Lung-RADS solid: "<6 mm", "6 to <8 mm", "8 to <15 mm", ">=15 mm"; ground-glass "<30 mm" and ">=30 mm".
* Part-solid under Lung-RADS: we estimate one diameter, so it is taken as the TOTAL size and the solid
  component is unknown. We give the most cautious category consistent with that (solid component assumed
  as large as the total): total < 6 mm -> 2; 6 to < 8 mm -> 4A (a solid component of 6 to < 8 mm is
  possible); >= 8 mm -> 4B (a solid component >= 8 mm is possible). A reader who knows the solid component
  is small would give 3 instead. The returned ``assumptions`` say so.

Measurement caveats: Fleischner asks for the average of the long and short axes on one slice, rounded to
the nearest whole mm (its bands also have volume equivalents: 100 mm^3 and 250 mm^3, spheres of about
5.8 and 7.8 mm); Lung-RADS uses the mean of the long and short axes to one decimal place. Our diameters
(learned, or :mod:`sizing`'s equivalent-sphere diameter) are neither, so a nodule near a boundary can fall
on the other side of it than a radiologist's measurement would. Round before calling if you want
Fleischner's whole-mm rule.

What we are unsure of (checked against our knowledge of Lung-RADS v2022, not against the ACR document
at the time of writing): the solid thresholds 6 / 8 / 15 mm and the part-solid solid-component thresholds
6 / 8 mm are as in v1.1 and, as far as we know, unchanged in v2022; the ground-glass threshold of 30 mm
(category 3 at baseline when >= 30 mm) dates from v1.1 (v1.0 used 20 mm). Rules that need more than a
diameter are not applied: category 1 (calcified or fat-containing nodules), perifissural / juxtapleural
solid nodules < 10 mm (category 2 in v2022), airway nodules, atypical cysts, the 4X and S modifiers, and
all rules about new or growing nodules at follow-up scans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from common import UserError

GUIDELINES = ("fleischner", "lung-rads")
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
RISKS = ("low", "high")
DISCLAIMER = ("research output, not a medical device; the category follows published size thresholds applied "
              "to an automatically estimated diameter and an assumed nodule type, risk and number of "
              "nodules, and must not be used for patient care")

INF = math.inf
# Size bands: label -> (lower mm, upper mm, lower bound included, upper bound included).
BANDS = {
    "<6 mm": (0.0, 6.0, True, False),
    "6-8 mm": (6.0, 8.0, True, True),          # Fleischner: 6.0 and 8.0 are both "6-8 mm"
    ">8 mm": (8.0, INF, False, False),
    ">=6 mm": (6.0, INF, True, False),
    "6 to <8 mm": (6.0, 8.0, True, False),     # Lung-RADS
    ">=8 mm": (8.0, INF, True, False),
    "8 to <15 mm": (8.0, 15.0, True, False),
    ">=15 mm": (15.0, INF, True, False),
    "<30 mm": (0.0, 30.0, True, False),
    ">=30 mm": (30.0, INF, True, False),
}


class Rule(NamedTuple):
    """One row of :data:`RULES`. ``nodule_type`` "subsolid" matches part-solid and ground-glass; ``risk``
    "any" matches both risks; ``multiple`` None matches single and multiple nodules."""
    guideline: str
    nodule_type: str
    risk: str
    multiple: bool | None
    band: str
    category: str
    recommendation: str


_NONE, _OPT12 = "no routine follow-up", "optional CT at 12 months"
_LR2 = "Benign appearance: continue annual screening (LDCT in 12 months)."
_LR3 = "Probably benign: LDCT in 6 months."
_LR4B = ("Very suspicious: diagnostic chest CT with or without contrast, PET/CT and/or tissue sampling, "
         "or referral for clinical evaluation.")
RULES = (
    # Fleischner 2017, solid, single
    Rule("fleischner", "solid", "low", False, "<6 mm", _NONE, "No routine follow-up."),
    Rule("fleischner", "solid", "high", False, "<6 mm", _OPT12, "Optional CT at 12 months."),
    Rule("fleischner", "solid", "low", False, "6-8 mm", "CT at 6-12 months",
         "CT at 6-12 months, then consider CT at 18-24 months."),
    Rule("fleischner", "solid", "high", False, "6-8 mm", "CT at 6-12 months",
         "CT at 6-12 months, then CT at 18-24 months."),
    Rule("fleischner", "solid", "any", False, ">8 mm", "CT at 3 months, PET/CT or tissue sampling",
         "Consider CT at 3 months, PET/CT or tissue sampling."),
    # Fleischner 2017, solid, multiple (managed by the most suspicious nodule)
    Rule("fleischner", "solid", "low", True, "<6 mm", _NONE, "No routine follow-up."),
    Rule("fleischner", "solid", "high", True, "<6 mm", _OPT12, "Optional CT at 12 months."),
    Rule("fleischner", "solid", "low", True, "6-8 mm", "CT at 3-6 months",
         "CT at 3-6 months, then consider CT at 18-24 months."),
    Rule("fleischner", "solid", "high", True, "6-8 mm", "CT at 3-6 months",
         "CT at 3-6 months, then CT at 18-24 months."),
    Rule("fleischner", "solid", "any", True, ">8 mm", "CT at 3-6 months",
         "CT at 3-6 months, then consider CT at 18-24 months."),
    # Fleischner 2017, subsolid (risk does not change the advice)
    Rule("fleischner", "ground-glass", "any", False, "<6 mm", _NONE, "No routine follow-up."),
    Rule("fleischner", "ground-glass", "any", False, ">=6 mm", "CT at 6-12 months",
         "CT at 6-12 months to confirm persistence, then CT every 2 years until 5 years."),
    Rule("fleischner", "part-solid", "any", False, "<6 mm", _NONE, "No routine follow-up."),
    Rule("fleischner", "part-solid", "any", False, ">=6 mm", "CT at 3-6 months",
         "CT at 3-6 months to confirm persistence; if unchanged and the solid component stays < 6 mm, "
         "annual CT for 5 years (a persistent solid component >= 6 mm is highly suspicious)."),
    Rule("fleischner", "subsolid", "any", True, "<6 mm", "CT at 3-6 months",
         "CT at 3-6 months; if stable, consider CT at 2 and 4 years."),
    Rule("fleischner", "subsolid", "any", True, ">=6 mm", "CT at 3-6 months",
         "CT at 3-6 months; further management by the most suspicious nodule."),
    # Lung-RADS v2022, baseline screening scan (risk and number of nodules do not enter)
    Rule("lung-rads", "solid", "any", None, "<6 mm", "2", _LR2),
    Rule("lung-rads", "solid", "any", None, "6 to <8 mm", "3", _LR3),
    Rule("lung-rads", "solid", "any", None, "8 to <15 mm", "4A",
         "Suspicious: LDCT in 3 months; PET/CT may be considered (solid part >= 8 mm)."),
    Rule("lung-rads", "solid", "any", None, ">=15 mm", "4B", _LR4B),
    Rule("lung-rads", "part-solid", "any", None, "<6 mm", "2", _LR2),
    Rule("lung-rads", "part-solid", "any", None, "6 to <8 mm", "4A",
         "Suspicious: LDCT in 3 months (if the solid component is known to be < 6 mm: category 3, LDCT in "
         "6 months)."),
    Rule("lung-rads", "part-solid", "any", None, ">=8 mm", "4B",
         _LR4B + " (If the solid component is known to be < 6 mm: category 3; 6 to < 8 mm: 4A.)"),
    Rule("lung-rads", "ground-glass", "any", None, "<30 mm", "2", _LR2),
    Rule("lung-rads", "ground-glass", "any", None, ">=30 mm", "3", _LR3),
)


@dataclass(frozen=True)
class FollowUp:
    """A guideline's answer for one nodule: ``category`` (Lung-RADS "2", "3", "4A", "4B"; for Fleischner
    the first step, e.g. "CT at 6-12 months"), ``recommendation`` (short text), ``size_band`` (the band of
    the rule applied, e.g. "6-8 mm" or "8 to <15 mm") and ``assumptions`` (what was assumed, not measured)."""
    guideline: str
    category: str
    recommendation: str
    size_band: str
    assumptions: tuple


def _in_band(diameter_mm: float, band: str) -> bool:
    low, high, low_in, high_in = BANDS[band]
    return (diameter_mm >= low if low_in else diameter_mm > low) and \
        (diameter_mm <= high if high_in else diameter_mm < high)


def _check_diameter(diameter_mm) -> float:
    try:
        value = float(diameter_mm)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(diameter_mm, bool) or not math.isfinite(value) or value < 0:
        raise UserError(f"the nodule diameter must be a finite number of mm >= 0, got {diameter_mm!r}")
    return value


def check_options(guideline="fleischner", nodule_type="solid", risk="low") -> tuple:
    """``(guideline, nodule_type, risk)`` lower-cased (an Enum member gives its value); a value outside
    :data:`GUIDELINES`, :data:`NODULE_TYPES` or :data:`RISKS` raises UserError naming the option and the
    allowed values."""
    checked = []
    for value, option, allowed in ((guideline, "--guideline", GUIDELINES),
                                   (nodule_type, "--type", NODULE_TYPES), (risk, "--risk", RISKS)):
        text = str(getattr(value, "value", value)).strip().lower()
        if text not in allowed:
            raise UserError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
        checked.append(text)
    return tuple(checked)


def size_band(diameter_mm: float) -> str:
    """Fleischner 2017 solid-nodule band of a diameter in mm: "<6 mm" (d < 6), "6-8 mm" (6 <= d <= 8) or
    ">8 mm" (d > 8); for category-agreement tables. A negative or non-finite diameter raises UserError."""
    value = _check_diameter(diameter_mm)
    return next(band for band in ("<6 mm", "6-8 mm", ">8 mm") if _in_band(value, band))


def _assumptions(guideline: str, nodule_type: str, risk: str, multiple: bool) -> tuple:
    notes = [f"nodule type assumed {nodule_type} (not measured)",
             "diameter used as given (not rounded), as an estimate of the guideline's average diameter"]
    if guideline == "fleischner":
        notes += [f"patient risk assumed {risk}",
                  "multiple nodules assumed: advice for the most suspicious one" if multiple
                  else "single nodule assumed",
                  "incidental nodule in an adult aged 35 or more without known cancer or immunosuppression"]
    else:
        notes += ["baseline screening scan assumed (no prior scan: nothing new or growing)",
                  "calcification, fat, perifissural location and other non-size features not assessed"]
        if nodule_type == "part-solid":
            notes.append("part-solid: the diameter is taken as the total size and the solid component is "
                         "unknown; the most cautious category consistent with that is given")
    return tuple(notes)


def follow_up(diameter_mm: float, guideline: str = "fleischner", nodule_type: str = "solid",
              risk: str = "low", multiple: bool = False) -> FollowUp:
    """The follow-up category and recommendation of ``guideline`` for a nodule of ``diameter_mm`` (mm).

    ``guideline``: one of :data:`GUIDELINES`; ``nodule_type``: one of :data:`NODULE_TYPES`; ``risk``: one
    of :data:`RISKS` (Fleischner's patient risk; ignored by Lung-RADS); ``multiple``: several nodules
    (Fleischner only). Bad values raise :class:`common.UserError` naming the option (--guideline, --type,
    --risk) and the allowed values; a negative or non-finite diameter raises UserError too.
    """
    value = _check_diameter(diameter_mm)
    guideline, nodule_type, risk = check_options(guideline, nodule_type, risk)
    multiple = bool(multiple)
    types = (nodule_type, "subsolid") if nodule_type != "solid" else (nodule_type,)
    for rule in RULES:
        if (rule.guideline == guideline and rule.nodule_type in types and rule.risk in (risk, "any")
                and rule.multiple in (multiple, None) and _in_band(value, rule.band)):
            return FollowUp(guideline, rule.category, rule.recommendation, rule.band,
                            _assumptions(guideline, nodule_type, risk, multiple))
    raise AssertionError(f"no rule for {guideline}, {nodule_type}, {risk}, multiple={multiple}, {value} mm")
