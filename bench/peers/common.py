"""The command line every peer adapter shares: what bench/prune_peers.py passes to each."""
from __future__ import annotations

import argparse
from pathlib import Path


def peer_parser(doc: str, target_keys) -> argparse.ArgumentParser:
    """--hf-dir, --calib, --save, --target, --stats; an adapter adds its own flags."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", type=Path, required=True, help="teacher HF directory (read only)")
    p.add_argument("--calib", type=Path, required=True,
                   help="torch.load -> LongTensor [rows, seq] of calibration token ids, fed as given")
    p.add_argument("--save", type=Path, required=True, help="output HF directory (replaced)")
    p.add_argument("--target", required=True,
                   help=f"JSON object with keys from {', '.join(target_keys)}; absent = unchanged")
    p.add_argument("--stats", type=Path, required=True,
                   help="JSON file for wall_s, peak_rss_mb, target, params")
    return p
