"""``egm-assist next --project ID -n N``: the N tasks a human should label next (most uncertain first)."""

from __future__ import annotations

import json

from egm.cli.errors import fail, missing_key, service_errors
from egm.cli.commands._common import settings_from_flags


def register(sub) -> None:
    p = sub.add_parser("next", help="list the most uncertain unlabeled tasks of a project (active learning)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("-n", type=int, default=20, help="how many tasks (default 20)")
    p.add_argument("--model-version", help="rank predictions of this version (default: the version the live "
                   "workers serve; with no live worker, the project's selected model version)")
    p.add_argument("--set-project-version", action="store_true",
                   help="make --model-version the project's selected version (Label Studio scores only that one)")
    p.add_argument("--save-view", metavar="TITLE", help="save them as a Data Manager view (tab), most uncertain first")
    p.add_argument("--ls-url", help="Label Studio URL (LABEL_STUDIO_URL)")
    p.add_argument("--ls-key", help="Label Studio API key (LABEL_STUDIO_API_KEY)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_command)


@service_errors
def run_command(args) -> int:
    from egm.active_learning import next_candidates, view_for
    from egm.labelstudio import LabelStudioClient, LabelStudioError

    settings = settings_from_flags(LABEL_STUDIO_URL=args.ls_url, LABEL_STUDIO_API_KEY=args.ls_key)
    if settings.label_studio_api_key is None:
        return missing_key("next")
    client = LabelStudioClient.from_settings(settings)
    try:
        version = _version(client, args, _fleet_version(settings))
        chosen_all, unpredicted = next_candidates(client, args.project, version)
        chosen = chosen_all[:max(0, args.n)]
        view = None
        if args.save_view and chosen:
            filters, ordering = view_for(chosen)
            view = client.create_view(args.project, args.save_view, filters=filters, ordering=ordering)
    except (LabelStudioError, ValueError) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps({"model_version": version, "tasks": [{"id": c.task_id, "score": c.score} for c in chosen],
                          "candidates": len(chosen_all), "unpredicted": unpredicted,
                          "view": None if view is None else {"id": view.id, "title": view.title}}, indent=1))
        return 0
    print(f"next {len(chosen)} of {len(chosen_all)} unlabeled predicted tasks (model version {version}), "
          f"most uncertain first:")
    for c in chosen:
        print(f"  task {c.task_id:<8} score {'-' if c.score is None else f'{c.score:.4f}'}")
    if unpredicted:
        print(f"{unpredicted} unlabeled task(s) have no prediction of this version yet: "
              f"egm-assist prelabel --project {args.project}")
    if view is not None:
        print(f"saved as view {view.id} '{view.title}' (Data Manager tab; 'Label All Tasks' follows its order)")
    return 0


def _fleet_version(settings) -> str | None:
    """The version the live workers serve (what new predictions are made with), if any is live."""
    import redis

    from egm.fleet import Fleet, FleetError
    from egm.queue import connect

    try:
        return Fleet.from_settings(settings, connect(settings)).current_version()
    except (FleetError, redis.RedisError):
        return None


def _version(client, args, live: str | None) -> str:
    """Label Studio computes the Data Manager's prediction score for the project's selected version only."""
    selected = client.get_project(args.project).model_version
    wanted = args.model_version or live or selected
    if not wanted:
        raise ValueError("no live worker and the project has no selected model version: pass --model-version "
                         "(and --set-project-version), or run prelabel first")
    if wanted != selected:
        if not args.set_project_version:
            whose = "the live workers serve" if wanted == live and not args.model_version else "you asked for"
            raise ValueError(f"the project shows model version {selected!r}, but {whose} {wanted!r}; add "
                             f"--set-project-version to switch it (scores are computed for that version only; "
                             f"'egm-assist prelabel --project {args.project}' predicts the tasks with it)")
        client.set_project_model_version(int(args.project), wanted)
    return wanted
