"""``egm-assist parse``: EGM completion on stdin -> reasoning, boxes (grid and pixels), status as JSON."""

from __future__ import annotations

import json
import sys

from egm.cli.errors import EXIT_OK, EXIT_USAGE, fail
from egm.geometry import grid_to_pixels
from egm.parsing import parse_completion


def register(sub) -> None:
    p = sub.add_parser("parse", help="parse an EGM completion read from stdin and print JSON",
                       description="Parse an EGM completion read from stdin and print its reasoning and boxes as "
                                   "JSON. Exits 1 when no box can be read (status unparseable).")
    p.add_argument("--width", type=int, required=True, help="width of the (upright) image in pixels")
    p.add_argument("--height", type=int, required=True, help="height of the (upright) image in pixels")
    p.set_defaults(func=run)


def parse_to_dict(text: str, width: int, height: int) -> dict:
    parsed = parse_completion(text)
    return {
        "status": parsed.status.value,
        "reasoning": parsed.reasoning,
        "notes": parsed.notes,
        "boxes": [
            {"label": b.label, "bbox_2d": [round(v, 2) for v in b.box.to_list()],
             "pixels": grid_to_pixels(b.box, width, height).to_list(2)}
            for b in parsed.boxes
        ],
        "image": {"width": width, "height": height},
    }


def run(args) -> int:
    if args.width <= 0 or args.height <= 0:
        return fail("--width and --height must be positive", EXIT_USAGE)
    data = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    doc = parse_to_dict(data, args.width, args.height)
    print(json.dumps(doc, ensure_ascii=False, indent=2))
    if doc["status"] == "unparseable":  # the JSON says why; the exit code lets scripts notice
        return fail("no box could be read from the completion (status unparseable)")
    return EXIT_OK
