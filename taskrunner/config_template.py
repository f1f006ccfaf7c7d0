"""The `.taskrun.yaml` that `taskrun init` writes: every key at its default, explained (README, Configuration)."""

from __future__ import annotations

from taskrunner.defaults import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    DEFAULT_AGENT,
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    LOCAL_SLOTS,
    LOCAL_WORKER,
    OFFLINE_AFTER_SECONDS,
    RETRIES,
    TIMEOUT,
)
from taskrunner.duration import format_duration

INIT_TEMPLATE = f"""\
# taskrun configuration (every key is documented in docs/configuration.md).
# Every key is optional; the values below are the defaults, spelled out.

# The Agent a Task uses when its front matter names none.
default_agent: {DEFAULT_AGENT}

# Agents: named ways of carrying out a Task.
agents:
  # Runs the Task body's ```sh / ```bash code blocks as one bash script.
  shell:
    preset: shell
  # An AI coding CLI (presets claude, codex, gemini, aider), run headless;
  # its event stream is read into output.log and the Run's record. The CLI
  # must be on the Worker's PATH (or set `path`). Credentials are only named
  # here and resolved on the Worker; they never enter the repository.
  # claude:
  #   preset: claude
  #   backend: {{provider: anthropic, model: claude-sonnet-4-5}}
  #   env: [ANTHROPIC_API_KEY]
  #   max_turns: 30                  # budgets, enforced by the Worker (a Task's front matter overrides)
  #   max_cost_usd: 5.00
  #   permission_mode: acceptEdits
  #   allowed_tools: [Read, Edit, Write, "Bash(git diff:*)"]
  #   pause_scope: everywhere        # a usage limit pauses it on every Worker (worker: only there)
  #   # path: /opt/claude/bin/claude   # the CLI, when it is not on the Worker's PATH
  #   # prompt_template_file: .taskrun/prompt.md.j2

# Workers: machines that execute Runs (ssh Workers: see docs/protocol.md).
workers:
  {LOCAL_WORKER}:
    transport: local
    # How many Runs this Worker carries out at the same time.
    slots: {LOCAL_SLOTS}
    agents: [shell]
    # Agents run confined in a bubblewrap sandbox (install bubblewrap). `none`
    # accepts unconfined Agents on this Worker when it cannot make a sandbox.
    sandbox: bwrap
  # SSH Workers are added with `taskrun worker add` (see docs/protocol.md, SSH Workers):
  # build-1:
  #   transport: ssh
  #   host: 10.0.0.5
  #   user: taskrun                     # default: your user name
  #   identity: ~/.ssh/other_key        # default: the daemon's .git/taskrun/ssh_key
  #   host_key: "ssh-ed25519 AAAA..."   # pinned by `taskrun worker add`
  #   worker_key: "ed25519 AAAA..."     # the Worker's result key, pinned by `taskrun worker add`
  #   slots: 4
  #   labels: {{gpu: "true"}}
  #   agents: [shell]

scheduler:
  # Retries after a failed Run (a Task's `retries` overrides it).
  retries: {RETRIES}
  # Wait before a retry: base, doubling each attempt, up to max, with jitter.
  backoff:
    base: {format_duration(BACKOFF_BASE)}
    max: {format_duration(BACKOFF_MAX)}
  # A Run still going after this long is killed (a Task's `timeout` overrides it).
  timeout: {format_duration(TIMEOUT)}
  # Parallel caps per Task group, e.g. {{backend: {{parallel: 1}}}}.
  groups: {{}}
  # A Worker that sends nothing (Workers heartbeat every {format_duration(HEARTBEAT_SECONDS)}) for this long is offline.
  worker_offline_after: {format_duration(OFFLINE_AFTER_SECONDS)}
  # Runs on an offline Worker wait this long for it to come back, then are retried.
  worker_grace: {format_duration(GRACE_SECONDS)}

git:
  # Commit the runs/ records.
  commit: true
  # Push the record commits and result branches to `remote`.
  push: false
  remote: origin
  # An Agent's change comes back as a commit on <prefix><task-id>.
  result_branch_prefix: taskrun/
  author: "taskrun <taskrun@localhost>"
  # Fetch `remote` this often and fast-forward (off: only `taskrun trigger`).
  # poll: 30s
  # pull_requests: {{forge: github, api_url: https://api.github.com, repository: owner/name, token_env: GITHUB_TOKEN}}

records:
  # A finished Run's output.log over this many bytes is committed as its head and
  # tail with a marker line; the full log stays in .git/taskrun/logs/ (`taskrun logs`).
  max_log_bytes: 4194304
  # Full logs are removed this long after their last byte, and the oldest first
  # while all of them hold more than full_logs_max_bytes.
  keep_full_logs: 30d
  full_logs_max_bytes: 10737418240
  # Finished Tasks older than this leave the work tree in one commit (taskrun prune);
  # git keeps them. Off unless set.
  # prune_after: 90d

# What models cost, USD per million tokens: estimates a Run's cost where the
# tool reports tokens but no cost (cache prices default to the input price).
# prices:
#   claude-sonnet-4-5: {{input: 3.00, output: 15.00, cache_read: 0.30, cache_write: 3.75}}

# A receiver for forges' push webhooks (off unless configured):
# webhook:
#   listen: 127.0.0.1:8787
#   secret_env: TASKRUN_WEBHOOK_SECRET

# A Prometheus /metrics endpoint (off unless configured; docs/metrics.md):
# metrics:
#   listen: 127.0.0.1:9464

# Notifications: a command or a URL told of events (off unless configured; docs/notifications.md):
# notify:
#   - on: [failed]
#     command: [notify-send, taskrun]

# security:
#   # Only Tasks whose revision was committed with a good signature by a listed
#   # principal run (git's allowed_signers format; keep it outside the work tree).
#   allowed_signers: ~/.config/taskrun/allowed_signers
"""
