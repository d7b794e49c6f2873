"""`moeify push DIR REPO_ID`: check a checkpoint folder and publish it to the Hub with a model card."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moeify.cli.common import DirArg, JsonOpt, QuietOpt, TokenOpt, cli_command
from moeify.cli.console import Output


@cli_command
def push_command(
    out: Output,
    folder: DirArg,
    repo_id: Annotated[str, typer.Argument(help="Hub repository, namespace/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if missing; "
                                                 "default main).", show_default=False)] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request against main instead of "
                                            "committing to it.")] = False,
    commit_message: Annotated[str | None, typer.Option("--commit-message", "-m", help="Commit message.",
                                                       show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the folder, list the files and print the "
                                          "card; touch no network.")] = False,
    overwrite_card: Annotated[bool, typer.Option(
        "--overwrite-card", help="Upload a generated card even if the folder has a README.md (the local file "
        "is left as is).")] = False,
    token: TokenOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Publish a checkpoint folder to the Hugging Face Hub, with a generated model card.

    The folder is checked first (config, safetensors headers, index, no partial files).

    Files the Hub already has are not sent again: an interrupted push is finished by running it again.

    HF_ENDPOINT selects another Hub-compatible server.
    """
    from moeify.publish.hub import describe_plan, human_size, plan_push, push

    plan = plan_push(folder, repo_id, overwrite_card=overwrite_card, reporter=out)
    if dry_run:
        data = {**describe_plan(plan), "dry_run": True, "card_text": plan.card}
        files = Table("file", "size", box=None, pad_edge=False)
        for f in plan.files:
            label = f.path + ("  (generated card)" if f.local is None else "")
            files.add_row(escape(label), human_size(f.size))
        out.result(data, title=f"would push to {repo_id}",
                   rows=[("files", len(plan.files)), ("total", human_size(plan.total_bytes)),
                         ("card", plan.card_source)], tables=[files])
        if not json_mode and not quiet:
            out.out.print(f"\n--- {escape(plan.card_source)} README.md ---", highlight=False)
            out.out.print(plan.card, markup=False, highlight=False)
        return
    result = push(plan, token, revision=revision, create_pr=create_pr, private=private,
                  commit_message=commit_message, reporter=out,
                  progress=not (quiet or json_mode) and out.err.is_terminal)
    data = {"url": result.url, "pull_request": result.pr_url, "commit": result.commit_url,
            "files": result.uploaded_files, "total_bytes": result.total_bytes, "card": plan.card_source,
            "unchanged": result.unchanged}
    rows = [("url", result.url)]
    if result.pr_url:
        rows.append(("pull request", result.pr_url))
    rows += [("files", result.uploaded_files), ("size", human_size(result.total_bytes)),
             ("card", plan.card_source)]
    if result.unchanged:
        rows.append(("note", "nothing changed since the last push; no new commit"))
    out.result(data, title=f"pushed to {repo_id}", rows=rows)
