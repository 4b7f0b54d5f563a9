"""Rule `aggregate`: thin adapter from the rule's command line to cohortseg.workflow.aggregate."""
from pathlib import Path

from _common import job_args, run

from cohortseg.workflow.aggregate import aggregate
from cohortseg.workflow.discovery import split_session_key
from cohortseg.workflow.steps import shard_sessions


def main():
    a = job_args(__doc__, "summary", "finalize_records", "--ratings", nargs={"finalize_records": "+", "--ratings": "*"})
    sessions = shard_sessions(a.finalize_records)  # every planned session, also one without a record
    aggregate(list(sessions.values()), Path(a.summary).parent, a.config,
              expected=[split_session_key(k) for k in sessions], ratings=a.ratings[0] if a.ratings else None)


run(main)
