"""Multislice HAADF reference for the incoherent simulator, with abTEM in its own venv.

    python3.11 -m venv /tmp/abtem-venv && /tmp/abtem-venv/bin/pip install abtem
    nice -n 19 /tmp/abtem-venv/bin/python benchmarks/abtem_reference.py

Frozen-phonon multislice (abTEM) of SrTiO3 [001] and CdTe [110] at two thicknesses: 200 kV,
20 mrad probe without aberrations, 70-200 mrad annular detector. The 3-D structures are
built here from the lattice constants, independently of the 2-D registry, and scanned over
a 3 x 3 grid round every column of a small supercell; a quadratic fit to the log signal
gives each column's peak, averaged over the supercell's cells (they differ under frozen
phonons). Writes tests/fixtures/abtem_reference.json: per registry column its fractional
peak position and peak intensity, plus the signal at the empty channels (the registry's
interstitial sites), which tests/test_simulator.py compares with simulate_image.
"""

import json
import os
import sys
import time

import abtem
import numpy as np
from ase import Atoms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from components.materials import get_material  # noqa: E402  (plain Python, no project deps)

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "abtem_reference.json")
ENERGY_EV = 200e3
SEMIANGLE_MRAD = 20.0
DETECTOR_MRAD = (70.0, 200.0)
SAMPLING_A = 0.04  # potential grid: (2/3) * wavelength / (2 * 0.04 A) = 209 mrad > outer angle
PEAK_STEP_A = 0.12  # 3 x 3 probe positions round each column
SLICE_A = 1.0
PHONON_CONFIGS = 6
THICKNESSES_NM = (5.0, 10.0)  # rounded to whole repeats along the beam
# Thermal rms displacements (A), room temperature, from Debye-Waller factors B = 8 pi^2 u^2.
SIGMAS = {"Sr": 0.077, "Ti": 0.063, "O": 0.083, "Cd": 0.14, "Te": 0.13}


def srtio3(a=3.905):
    """Cubic perovskite, x [100], y [010], beam [001]."""
    frac = {"Sr": [(0, 0, 0)], "Ti": [(0.5, 0.5, 0.5)],
            "O": [(0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]}
    symbols = [s for s, ps in frac.items() for _ in ps]
    positions = [np.array(p) * a for ps in frac.values() for p in ps]
    return Atoms(symbols, positions=positions, cell=[a, a, a], pbc=True)


def cdte(a=6.481):
    """Zinc blende in the orthogonal [110] cell: x [1-10], y [001], beam [110]."""
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    frame = np.array([[1, -1, 0], [0, 0, np.sqrt(2)], [1, 1, 0]]) / np.sqrt(2)
    cell = np.array([a / np.sqrt(2), a, a / np.sqrt(2)])
    symbols, positions = [], []
    for symbol, shift in (("Cd", 0.0), ("Te", 0.25)):
        xyz = np.mod((fcc + shift) * a @ frame.T, cell)
        for p in np.unique(np.round(xyz, 6) % np.round(cell, 6), axis=0):
            symbols.append(symbol)
            positions.append(p)
    return Atoms(symbols, positions=positions, cell=cell, pbc=True)


def reference(name, unit, tiles, thickness_nm):
    """Peak position and intensity of every registry column, and the empty-channel level.

    The probe visits a small grid round each column of every cell of the supercell: with
    frozen phonons the cells differ, so their peaks are fitted apart and then averaged.
    """
    material = get_material(name)
    repeats = int(round(thickness_nm * 10 / unit.cell[2, 2]))
    atoms = unit * (tiles[0], tiles[1], repeats)
    phonons = abtem.FrozenPhonons(atoms, num_configs=PHONON_CONFIGS,
                                  sigmas={s: SIGMAS[s] for s in set(atoms.get_chemical_symbols())},
                                  seed=1)
    potential = abtem.Potential(phonons, sampling=SAMPLING_A, slice_thickness=SLICE_A)
    probe = abtem.Probe(energy=ENERGY_EV, semiangle_cutoff=SEMIANGLE_MRAD)
    cell = np.array([unit.cell[0, 0], unit.cell[1, 1]])
    cells = np.array([(i, j) for i in range(tiles[0]) for j in range(tiles[1])])
    offsets = np.stack(np.meshgrid(*(np.arange(-1, 2) * PEAK_STEP_A,) * 2, indexing="ij"),
                       axis=-1).reshape(-1, 2)
    peaks = np.array([(np.array(c.position) + k) * cell for c in material.columns for k in cells])
    channels = np.array([(np.array(c.position) + k) * cell
                         for c in material.interstitials for k in cells])
    positions = np.concatenate([(peaks[:, None, :] + offsets).reshape(-1, 2), channels])
    detector = abtem.AnnularDetector(inner=DETECTOR_MRAD[0], outer=DETECTOR_MRAD[1])
    start = time.perf_counter()
    measured = probe.scan(potential, scan=abtem.CustomScan(positions), detectors=detector)
    signal = np.asarray(measured.compute(progress_bar=False).array, dtype=np.float64)
    seconds = time.perf_counter() - start
    grids = signal[: len(peaks) * len(offsets)].reshape(len(peaks), len(offsets))
    columns = []
    for n, column in enumerate(material.columns):
        fits = [_fit_peak(offsets, grids[n * len(cells) + k]) for k in range(len(cells))]
        shift = np.array([f[0] for f in fits])
        height = np.array([f[1] for f in fits])
        columns.append({
            "name": column.name,
            "registry": list(column.position),
            "position": list(np.array(column.position) + shift.mean(axis=0) / cell),
            "position_spread": list(shift.std(axis=0) / cell),
            "intensity": float(height.mean()),
            "intensity_spread": float(height.std()),
        })
    return {
        "material": name,
        "zone_axis": material.zone_axis,
        "thickness_nm": repeats * unit.cell[2, 2] / 10,
        "repeats": repeats,
        "supercell": list(tiles),
        "probe_positions": len(positions),
        "seconds": seconds,
        "channel_intensity": float(signal[len(peaks) * len(offsets):].mean()),
        "columns": columns,
    }


def _fit_peak(offsets, values):
    """Vertex (A, relative to the grid centre) and height of a quadratic fit to log(values)."""
    x, y = offsets.T
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    c = np.linalg.lstsq(design, np.log(values), rcond=None)[0]
    hessian = np.array([[2 * c[3], c[4]], [c[4], 2 * c[5]]])
    vertex = np.linalg.solve(hessian, -c[1:3])
    log_peak = c[0] + c[1:3] @ vertex + 0.5 * vertex @ hessian @ vertex
    return vertex, float(np.exp(log_peak))


def main():
    abtem.config.set({"fftw.threads": 1, "mkl.threads": 1})
    result = {
        "abtem_version": abtem.__version__,
        "energy_ev": ENERGY_EV,
        "semiangle_mrad": SEMIANGLE_MRAD,
        "detector_mrad": list(DETECTOR_MRAD),
        "potential_sampling_a": SAMPLING_A,
        "peak_grid_step_a": PEAK_STEP_A,
        "slice_thickness_a": SLICE_A,
        "frozen_phonon_configs": PHONON_CONFIGS,
        "rms_displacement_a": SIGMAS,
        "runs": [],
    }
    for thickness in THICKNESSES_NM:
        for name, unit, tiles in (("SrTiO3", srtio3(), (2, 2)), ("CdTe", cdte(), (2, 1))):
            part = reference(name, unit, tiles, thickness)
            result["runs"].append(part)
            print(f"{name}: {part['seconds']:.0f} s, thickness {part['thickness_nm']:.2f} nm")
            top = max(c["intensity"] for c in part["columns"])
            for c in part["columns"]:
                print(f"  {c['name']:4s} at {np.round(c['position'], 4)} (registry "
                      f"{c['registry']}): {c['intensity'] / top:.3f} of the brightest")
            print(f"  channel {part['channel_intensity'] / top:.3f} of the brightest")
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
