"""``GET /host/info`` facts read from the host's sysfs (never from the network).

The original (ghw) downloaded ``pci.ids`` from the Internet when no local copy existed
and ignored virtio/xen disks. Here names come from a local ``pci.ids`` only (unknown
ids are reported as ``unknown``, their hex ids under extra keys) and every real block
device counts as a disk (``sd``, ``hd``, ``vd``, ``xvd``, ``nvme``, ``mmcblk``; not loop,
ram, zram, device-mapper, md or optical drives).

Pure readers over a root directory (the host root, e.g. ``/host``, else ``/``), so
tests build a fake sysfs in a temporary directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

PCI_IDS_PLACES = ("usr/share/hwdata/pci.ids", "usr/share/misc/pci.ids", "usr/share/pci.ids")
_DISK = re.compile(r"^(sd[a-z]+|hd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+|mmcblk\d+)$")


def sysfs_root(host_root: Path) -> Path:
    """The host's sysfs as seen by the agent: ``<host root>/sys`` when mounted, else ``/sys``."""
    candidate = host_root / "sys"
    return candidate if (candidate / "block").is_dir() or (candidate / "bus").is_dir() else Path("/sys")


def find_pci_ids(host_root: Path) -> Path | None:
    for root in (host_root, Path("/")):
        for place in PCI_IDS_PLACES:
            path = root / place
            if path.is_file():
                return path
    return None


class PciNames:
    """Vendor and device names from a ``pci.ids`` file (parsed once, cached by mtime)."""

    def __init__(self) -> None:
        self._cache: tuple[Path, float, dict[str, str], dict[tuple[str, str], str]] | None = None

    def lookup(self, path: Path | None) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        if path is None:
            return {}, {}
        mtime = path.stat().st_mtime
        if self._cache is None or self._cache[0] != path or self._cache[1] != mtime:
            vendors, devices = parse_pci_ids(path.read_text(encoding="utf-8", errors="replace"))
            self._cache = (path, mtime, vendors, devices)
        return self._cache[2], self._cache[3]


def parse_pci_ids(text: str) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """Pure: ``pci.ids`` -> ({vendor id: name}, {(vendor id, device id): name}), ids as
    lower-case 4-digit hex."""
    vendors: dict[str, str] = {}
    devices: dict[tuple[str, str], str] = {}
    vendor = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            break  # device classes follow: not needed
        if line.startswith("\t\t"):
            continue  # subsystems
        if line.startswith("\t"):
            if vendor is not None:
                ident, _, name = line[1:].partition(" ")
                devices[(vendor, ident.lower())] = name.strip()
            continue
        ident, _, name = line.partition(" ")
        vendor = ident.lower()
        vendors[vendor] = name.strip()
    return vendors, devices


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _hex_id(text: str | None) -> str:
    if not text:
        return ""
    return text.lower().removeprefix("0x")[-4:].rjust(4, "0")


def pci_devices(sys_root: Path, names: tuple[dict[str, str], dict[tuple[str, str], str]]) -> list[dict[str, Any]] | None:
    """``PCIDevices``: None when the directory cannot be read (as the original)."""
    directory = sys_root / "bus" / "pci" / "devices"
    try:
        addresses = sorted(os.listdir(directory))
    except OSError:
        return None
    vendors, devices = names
    result = []
    for address in addresses:
        vendor_id = _hex_id(_read(directory / address / "vendor"))
        device_id = _hex_id(_read(directory / address / "device"))
        result.append({
            "Vendor": vendors.get(vendor_id, "unknown"),
            "Name": devices.get((vendor_id, device_id), "unknown"),
            "Address": address,
            "VendorID": vendor_id,
            "DeviceID": device_id,
            "Class": (_read(directory / address / "class") or "").removeprefix("0x"),
        })
    return result


def physical_disks(sys_root: Path, vendors: dict[str, str]) -> list[dict[str, Any]] | None:
    """``PhysicalDisks``: None when no disk is found (as the original's nil slice)."""
    directory = sys_root / "block"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    disks = []
    for name in names:
        if not _DISK.match(name):
            continue
        sectors = _read(directory / name / "size")
        size = int(sectors) * 512 if sectors and sectors.isdigit() else 0
        vendor = _read(directory / name / "device" / "vendor") or "unknown"
        if vendor.lower().startswith("0x"):  # virtio: a PCI vendor id
            vendor = vendors.get(_hex_id(vendor), vendor)
        disks.append({
            "Vendor": vendor,
            "Size": size,
            "Name": name,
            "Model": _read(directory / name / "device" / "model") or "",
            "Rotational": _read(directory / name / "queue" / "rotational") == "1",
            "Removable": _read(directory / name / "removable") == "1",
        })
    return disks or None


def host_info(host_root: Path, names: PciNames) -> dict[str, Any]:
    """The ``/host/info`` document (blocking: a few hundred small sysfs reads)."""
    sys_root = sysfs_root(host_root)
    table = names.lookup(find_pci_ids(host_root))
    return {
        "PCIDevices": pci_devices(sys_root, table),
        "PhysicalDisks": physical_disks(sys_root, table[0]),
    }
