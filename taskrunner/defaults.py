"""Every default of taskrun, named and documented in one place."""

from __future__ import annotations

CONFIG_FILE = ".taskrun.yaml"
TASKS_DIR = "tasks"
RUNS_DIR = "runs"
HOOKS_DIR = "hooks"
#: Local state in the git directory so it can never be committed by accident. This is
#: where it is in an ordinary clone; gitops.state_dir asks git (worktrees, submodules, GIT_DIR).
STATE_DIR = ".git/taskrun"

DEFAULT_AGENT = "shell"
LOCAL_WORKER = "local"
#: Slots of the embedded local Worker when no configuration exists.
LOCAL_SLOTS = 2

#: Retries after a failed Run; a cancelled Run is never retried.
RETRIES = 0
#: A Run lost with its Worker (gone past the grace period, removed, no longer
#: holding it) is run again this many times per revision on top of `retries`:
#: the Agent did not fail. Bounded, in case the Task is what takes Workers down.
LOST_RUN_RETRIES = 3
#: Exponential backoff between retries: base * 2**(attempt-1), capped, with jitter.
BACKOFF_BASE = 5.0
BACKOFF_MAX = 300.0
#: A Run is killed (its whole process group) after this many seconds.
TIMEOUT = 3600.0

#: Task files larger than this become INVALID rather than being read into memory.
MAX_TASK_FILE_BYTES = 256 * 1024
#: A `.taskrun.yaml` larger than this is refused (ConfigError) before it is read
#: whole or parsed: YAML costs seconds of CPU per megabyte, even of comments,
#: and a reload runs on the daemon's event thread.
MAX_CONFIG_FILE_BYTES = 1024 * 1024
#: A `workers.<name>.known_hosts` file larger than this is refused when a
#: Worker is connected to, before it is parsed.
MAX_KNOWN_HOSTS_BYTES = 16 * 1024 * 1024
#: A Task's `context` files together: a Run whose files hold more FAILS, and
#: nothing of them is read (their sizes are known before). They are read
#: whole into memory, on the daemon's event thread, to go into the bundle.
MAX_CONTEXT_BYTES = 64 * 1024 * 1024

#: Edits that do not end in a close-after-write (editors that write in place
#: without closing, or tools that only touch mtime) are read once the file
#: has been quiet this long.
DEBOUNCE_SECONDS = 0.15

#: Runs that finish within this window share one commit.
COMMIT_WINDOW_SECONDS = 0.25
#: A Task or Run record turning RUNNING may reach runs/ this much later: a Run that ends sooner is written once.
RECORD_LAG_SECONDS = 0.1

#: A Worker sends a heartbeat this often (fixed on the Worker side).
HEARTBEAT_SECONDS = 2.0
HEARTBEAT_MISSES = 3
#: A Worker silent this long (missing HEARTBEAT_MISSES heartbeats in a row) is
#: marked offline (`scheduler.worker_offline_after`).
OFFLINE_AFTER_SECONDS = HEARTBEAT_SECONDS * HEARTBEAT_MISSES
#: The shortest `worker_offline_after` accepted: two heartbeat intervals, so
#: one late heartbeat does not take a healthy Worker offline.
MIN_OFFLINE_AFTER_SECONDS = 2 * HEARTBEAT_SECONDS
#: A session's reads give up this long after `worker_offline_after`: the engine
#: notices the silence first, the bounded read only frees the reader thread.
READ_MARGIN_SECONDS = 2.0
#: Runs on an offline Worker wait this long for it to return before they are
#: retried elsewhere (`scheduler.worker_grace`).
GRACE_SECONDS = 60.0

#: Largest output chunk a Worker sends in one record.
OUTPUT_CHUNK_BYTES = 1024 * 1024
#: How often the Worker looks for new output while Runs are active (an Agent
#: that ends wakes it at once); idle Workers only wake for heartbeats and messages.
WORKER_POLL_SECONDS = 0.02

#: A signed bundle is valid this long after it is issued: it is sent at once,
#: so this only bounds how long its replay-ledger entry must be kept.
BUNDLE_TTL_SECONDS = 600.0
#: Clocks of the control plane and a Worker may differ by this much: a bundle
#: issued up to this far in the future, or expired by at most this, is taken.
CLOCK_SKEW_SECONDS = 300.0
#: A trust statement (enrollment, key rotation) is valid this long.
TRUST_TTL_SECONDS = 600.0
#: `taskrun-worker init` / `trust --reset`: how long a one-time enrollment token is valid.
ENROLL_TOKEN_TTL_SECONDS = 24 * 3600.0
#: A Worker session that has not authenticated (an `auth` record signed by a
#: trusted key) this long after its hello is closed by the Worker.
AUTH_TIMEOUT_SECONDS = 30.0
#: `taskrun keys rotate`: how long the old signing key stays trusted.
KEY_OVERLAP_SECONDS = 7 * 24 * 3600.0

#: Where taskrun-worker keeps its Runs when no --home is given.
WORKER_HOME = "~/.taskrun-worker"

#: The git trailer keys written on every result commit.
TRAILER_KEYS = ("Task-Id", "Run-Id", "Worker", "Agent", "Status")
