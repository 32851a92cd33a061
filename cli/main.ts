/**
 * Implements: the `flotilla` command line — parsing, help, and dispatch to the commands.
 *
 *   flotilla start  [job file] [--steps N] [--workers N] [--ps-shards N] [--backend B] [--json]
 *   flotilla up     [job file] [--workers N] [--ps-shards N] [--steps N] [--nats URL] [--json]
 *                   [--max-restarts N] [--restart-window DURATION]
 *   flotilla launch <loader|worker|evaluator|param-server|scheduler> --job NAME|FILE --nats URL
 *   flotilla ctl    <job> <verb> [args] [--nats URL]
 *   flotilla classify <checkpoint> [text ...] [--file F] [--json]
 *   flotilla export <checkpoint> --safetensors out.safetensors [--json]
 *   flotilla merge-lora <checkpoint> --out file.safetensors|file.ckpt [--json]
 *   flotilla quantize <checkpoint> --mode int8-dynamic|int8-static|int4-weight [--calib-batches N] [--out FILE] [--job FILE] [--json]
 *   flotilla generate <checkpoint|quantized-file> [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S] [--json]
 *   flotilla infra account <job> [--out DIR] [--shards K] [--force] [--env-refs]
 *   flotilla infra routes [--out FILE] [--force]
 *
 * Every command takes --help. Options override the job file, which overrides defaults.
 * Every command that talks to NATS (up, launch, ctl, quantize --nats) takes credentials:
 * --creds, --nkey, --user/--password, --token, --tls-ca/--tls-cert/--tls-key, or the
 * NATS_* variables (cli/auth.ts, docs/SECURITY.md).
 */
import { parseArgs, type ParseArgsConfig } from "node:util"
import { DEFAULT_JOB, loadJobFile, resolveJob, type JobConfig } from "../shared/config/job.ts"
import type { BackendPreference } from "../shared/compute/backend.ts"
import { runMain } from "./runtime.ts"
import { codecName, parseCodec } from "../shared/wire/codecs.ts"
import { DEFAULT_RESTART_POLICY, type RestartPolicy } from "./supervisor.ts"
import { AUTH_HELP, AUTH_OPTIONS, authFromArgs } from "./auth.ts"

export class UsageError extends Error {
  readonly _tag = "UsageError"
}

const COMMON = {
  steps: { type: "string" },
  workers: { type: "string" },
  "ps-shards": { type: "string" },
  stages: { type: "string" },
  "micro-batches": { type: "string" },
  pipeline: { type: "string" },
  job: { type: "string" },
  consistency: { type: "string" },
  codec: { type: "string" },
  backend: { type: "string" },
  json: { type: "boolean" },
  sample: { type: "string" },
  ...AUTH_OPTIONS,
  help: { type: "boolean", short: "h" }
} as const satisfies ParseArgsConfig["options"]

export const HELP: Record<string, string> = {
  main: `flotilla — train language models as a fleet of actors over NATS

usage: flotilla <command> [options]     (flotilla <command> --help for more)

commands:
  start    train a job with every actor in this process (no NATS server needed)
  up       run a job's whole topology as separate processes over NATS
  launch   run one actor and join a job over NATS (from any host)
  ctl      send a control message to a running job (status, pause, set-lr, ...)
  classify label texts with a trained classifier's checkpoint
  export   write a checkpoint as safetensors (Hugging Face GPT-2 names for a GPT)
  merge-lora  fold a LoRA job's adapters into its base weights
  quantize post-training quantization of a checkpoint (int8 / int4), with its validation loss
  generate sample text from a GPT checkpoint or quantized model file
  infra    operator tools: a job's NATS account and per-role credentials (infra account)
`,
  quantize: `usage: flotilla quantize <checkpoint> --mode int8-dynamic|int8-static|int4-weight [options]

Quantizes a trained checkpoint (a file or a job's checkpoint folder) and writes a quantized
model file (docs/QUANTIZATION.md), then evaluates the float32 and the quantized model on the
job's validation batches: sizes, validation loss (and a classifier's accuracy) side by side.
  int8-dynamic   int8 weights per output channel; each matmul input rounded to int8 with
                 its own absmax, per batch
  int8-static    the same weights; activation ranges calibrated on training batches, fixed
  int4-weight    int4 weights per group of 32 along the input dim; float activations

options:
  --calib-batches N  int8-static: training batches to calibrate on (default 8)
  --out FILE         the quantized file (default <checkpoint>.<mode>.qmodel)
  --job FILE         the job file whose data block to evaluate on (default: runs/<job>/job.json,
                     then jobs/<job>.yaml, then the defaults with the checkpoint's corpus)
  --json             one JSON object: sizeRatio, fp32ValLoss, quantValLoss, lossDelta, mode, ...
  --nats URL         ask a live quantizer of the checkpoint's job (flotilla launch quantizer) to
                     do it, with the paths as seen from here made absolute; here when none answers
                     (as the job's operator role: the credentials below)
  --backend B        tensorflow | wasm | cpu

${AUTH_HELP}`,
  generate: `usage: flotilla generate <checkpoint|quantized-file> [options]

Samples text from a trained GPT: a checkpoint file or a job's checkpoint folder (float32), or
a quantized model file from flotilla quantize (runs from its int8/int4 weights).

options:
  --prompt TEXT      text to continue (default a newline)
  --tokens N         bytes to sample (default 200)
  --temperature T    softmax temperature, 0 = greedy (default 0.8)
  --top-k K          sample among the K likeliest (default 40; 0 = all)
  --seed S           sampling seed (default 1337)
  --json             one JSON object: { source, format, mode, prompt, tokens, text }
  --backend B        tensorflow | wasm | cpu
`,
  export: `usage: flotilla export <checkpoint> --safetensors out.safetensors [--json]

Writes a trained model as safetensors (float32) and a config.json beside it. A GPT is
written with Hugging Face GPT-2's tensor names and layout (transformer.h.0.attn.c_attn.weight,
...; the head is tied to wte) and a GPT2LMHeadModel config, so transformers can load it.
<checkpoint> is a checkpoint file or a job's checkpoint folder (every shard at one
version); a LoRA job's adapters are merged into its base first.
`,
  "merge-lora": `usage: flotilla merge-lora <checkpoint> --out file.safetensors|file.ckpt [--json]

Merges a LoRA job's adapters into its base weights (W + alpha/r · A·B). The base is the
job's init.from (or seeded init), rebuilt as its parameter servers do. A .ckpt output is
a Flotilla checkpoint of the base model (usable by init.from); .safetensors as export.
`,
  classify: `usage: flotilla classify <checkpoint> [text ...] [--file F] [--json] [--backend B]

Labels each text with a trained classifier (e.g. jobs/spam-lstm.yaml) and prints
"label  probability  text". <checkpoint> is a checkpoint file
(checkpoints/<job>/ps-0/v00007550.ckpt) or a job's folder (checkpoints/<job>: the newest
version every shard holds), or a quantized model file (flotilla quantize). Either carries the
model, its class names and the tokenizer fitted on the training split, so texts are tokenized
as in training.

options:
  --file F           one text per line (blank lines skipped), after any given as arguments
  --json             one JSON object: { checkpoint, job, version, predictions: [{ text, label,
                     probability, probabilities: { <class>: p } }] }
  --backend B        tensorflow | wasm | cpu
`,
  start: `usage: flotilla start [job.json|job.yaml] [options]

Trains with every actor in one process on the in-process bus (the embedded default).
Defaults: a ${DEFAULT_JOB.model.kind === "gpt" ? `${DEFAULT_JOB.model.layers}-layer, width-${DEFAULT_JOB.model.width} GPT` : "model"} on Moby Dick, ${DEFAULT_JOB.train.steps} steps.

options:
  --steps N          optimizer steps (versions) to train
  --workers N        data-parallel workers (each its own replica)
  --ps-shards N      parameter-server shards
  --stages S         pipeline stages per replica (S > 1: each replica is S stage workers; psShards S)
  --micro-batches M  pipeline: micro-batches (loader batches) per step and replica, M ≥ S (default max(4, S))
  --pipeline P       pipeline schedule: 1f1b (default) | gpipe
  --consistency M    sync | async | bounded:S
  --codec C          gradient codec with error feedback: f32 (default) | bf16 | int8 | int4 | sign1 | topk:F
  --backend B        tensorflow | wasm | cpu (default: best available; env FLOTILLA_BACKEND)
  --json             print a machine-readable summary instead of the report
  --sample N         characters of text to sample at the end (default 200; 0 = none)
`,
  up: `usage: flotilla up [job file] [options]

Runs loader, scheduler, parameter-server shards, workers and an evaluator as separate
processes talking over NATS; starts a local nats-server when --nats is not given.

options:
  --nats URL         an existing NATS server (default: start one on a free port)
  --steps N, --workers N, --ps-shards N, --stages S, --micro-batches M, --pipeline P,
  --consistency M, --backend B   as for start (--workers R --stages S starts R×S workers)
  --codec C          gradient codec on the wire (train.compression.codec): f32 | bf16 | int8 | int4 | sign1 | topk:F
  --json             print a machine-readable summary at the end
  --max-restarts N   restarts allowed per actor within the restart window (default ${DEFAULT_RESTART_POLICY.maxRestarts}; 0 = none)
  --restart-window D the window of that budget: 300s, 5m, 1500ms (default ${DEFAULT_RESTART_POLICY.windowMs / 60_000}m)

An actor that dies (a crash, a signal) before the job is over is restarted after a
backoff (${DEFAULT_RESTART_POLICY.backoffMs} ms doubling to ${DEFAULT_RESTART_POLICY.backoffMaxMs / 1000} s; reset once it stayed up ${DEFAULT_RESTART_POLICY.resetAfterMs / 1000} s); a restarted
parameter server resumes from its checkpoint. up fails only when an actor's budget is
spent, with its exits and the tail of its log. An actor that exits 0 is done.

The nats-server up starts listens on 127.0.0.1 only and admits only this run's users: one
per actor (a worker may heartbeat only as itself), least privilege, random passwords, handed
to each process in its environment.
It prints how to reach the run with flotilla ctl (an operator nkey in runs/<job>/operator.nk).
With --nats, every process connects with the credentials given below, or, with
  --account DIR      the directory flotilla infra account wrote: each process as its role (a worker
                     as its own user when DIR has worker.<id>.nk: infra account --workers)

${AUTH_HELP}`,
  launch: `usage: flotilla launch <loader|worker|evaluator|param-server|scheduler|quantizer> --job NAME|FILE --nats URL [options]

Runs one actor that joins a job over NATS. --job is a job file (JSON/YAML) or a job name
(then the defaults are used: pass the same file to every actor of a job).

options:
  --nats URL         NATS server(s), comma separated (default nats://127.0.0.1:4222)
  --id ID            actor id (default <role>-<host>-<pid>)
  --shard K          param-server: which shard (default 0)
  --stage K          worker of a pipeline job (topology.stages > 1): which stage it hosts (required there)
  --replica R        worker of a pipeline job: which replica (a number, or an id; default 0 = worker-0)
  --codec C          train.compression.codec for this actor (the parameter servers' is the one that counts:
                     they stamp it on every version, and every sender encodes under it)
  --relay NAME       worker: push gradients through the quantizer relay NAME (f32, over the local link);
                     quantizer: be the relay NAME (sum its workers' gradients, one compressed push per version)
  --no-resume        param-server: start fresh at version 0, removing this shard's earlier checkpoints
                     (up passes it on the first start only, so a restart resumes)
  --min-workers N    param-server: the first step waits for N live workers

${AUTH_HELP}  Each role has its own user on a secured server (docs/SECURITY.md); a parameter server's id
  defaults to ps-<shard>, the id its user may heartbeat as.
`,
  infra: `usage: flotilla infra account <job> [--out DIR] [--shards K] [--workers ID,…] [--force] [--env-refs]
       flotilla infra routes [--out FILE] [--force]

Writes what an operator needs to add job <job> to a shared nats-server (docs/SECURITY.md):
  DIR/account.conf   the job's account: one nkey user per role with least-privilege permissions;
                     include it inside the accounts { } block of the server's config
  DIR/<role>.nk      each role's nkey seed (mode 0600): give it to that role's processes only,
                     flotilla launch <role> --nkey FILE (or NATS_NKEY=FILE); roles: loader, scheduler,
                     ps-0 … ps-<K-1>, worker, evaluator, quantizer, observer, operator, driver
  DIR/nkeys.env      the public keys as FLOTILLA_<JOB>_<ROLE>_NKEY=…, for a server config that names
                     them as variables (infra/nats/nats.conf does, for job gpt)

options:
  --out DIR          where (default nats-accounts/<job>); created mode 0700
  --shards K         parameter-server shards of the job: one user per shard (default 1, or the
                     job file's topology.psShards with --job FILE)
  --workers ID,…     a user per named worker (ID, or ID@REPLICA for a pipeline stage) in place of the
                     shared worker user: DIR/worker.<ID>.nk, which may heartbeat only as ID, hear only
                     its own acks and speak only in its replica's pipeline (launch it with --id ID)
  --force            replace seeds already in DIR (a key rotation: restart the job's processes)
  --env-refs         print the account block with $FLOTILLA_<JOB>_<ROLE>_NKEY references (the form of
                     infra/nats/nats.conf) and write nothing

infra routes writes FILE (default nats-accounts/routes.env, mode 0600): a random route password
and the route URLs nats-1..3 with it (FLOTILLA_ROUTE_PASSWORD, FLOTILLA_ROUTE_1..3), the variables
the cluster configs in infra/nats/cluster/ read.
`
}

const int = (name: string, v: string | undefined): number | undefined => {
  if (v === undefined) return undefined
  const n = Number(v)
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--${name} must be a positive integer, got ${JSON.stringify(v)}`)
  return n
}

const consistency = (v: string | undefined) => {
  if (v === undefined) return undefined
  if (v === "sync" || v === "async") return { mode: v }
  const m = /^bounded:(\d+)$/.exec(v)
  if (m) return { mode: "bounded", staleness: Number(m[1]) }
  throw new UsageError(`--consistency must be sync, async or bounded:S, got ${JSON.stringify(v)}`)
}

/** `--max-restarts N` and `--restart-window D` (D: a number of seconds, or with ms / s / m). */
export const restartPolicyFromArgs = (v: Record<string, unknown>): Partial<RestartPolicy> => {
  const out: { maxRestarts?: number; windowMs?: number } = {}
  const max = v["max-restarts"] as string | undefined
  if (max !== undefined) {
    const n = Number(max)
    if (!Number.isInteger(n) || n < 0 || max.trim() === "") throw new UsageError(`--max-restarts must be an integer >= 0, got ${JSON.stringify(max)}`)
    out.maxRestarts = n
  }
  const w = v["restart-window"] as string | undefined
  if (w !== undefined) {
    const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(w.trim())
    const ms = m ? Number(m[1]) * (m[2] === "ms" ? 1 : m[2] === "m" ? 60_000 : 1_000) : Number.NaN
    if (!(ms > 0)) throw new UsageError(`--restart-window must be a duration like 300s, 5m or 1500ms, got ${JSON.stringify(w)}`)
    out.windowMs = ms
  }
  return out
}

/** `--codec C`: the registry's canonical name (a usage error listing the codecs), or undefined when not given. */
export const codecFromFlag = (c: unknown): string | undefined => {
  if (c === undefined) return undefined
  const r = parseCodec(String(c))
  if (r._tag === "Failure") throw new UsageError(`--codec: ${r.failure}`)
  return codecName(r.success)
}

/** Job from a file (or defaults) with command-line overrides applied. */
export const jobFromArgs = (file: string | undefined, v: Record<string, unknown>): JobConfig => {
  const base: Record<string, any> = file ? { ...loadJobFile(file) } : {}
  const patch: Record<string, any> = { train: {}, topology: {} }
  const steps = int("steps", v.steps as string | undefined)
  if (steps) patch.train.steps = steps
  const c = consistency(v.consistency as string | undefined)
  if (c) patch.train.consistency = c
  const w = int("workers", v.workers as string | undefined)
  if (w) patch.topology.workers = w
  const k = int("ps-shards", v["ps-shards"] as string | undefined)
  if (k) patch.topology.psShards = k
  // a pipeline: each stage gets its own shard unless --ps-shards says otherwise
  const st = int("stages", v.stages as string | undefined)
  if (st) {
    patch.topology.stages = st
    if (!k) patch.topology.psShards = st
    if (base.topology?.microBatches === undefined || base.topology.microBatches < st) patch.topology.microBatches = Math.max(4, st)
  }
  const mb = int("micro-batches", v["micro-batches"] as string | undefined)
  if (mb) patch.topology.microBatches = mb
  if (v.pipeline !== undefined) {
    if (v.pipeline !== "1f1b" && v.pipeline !== "gpipe") throw new UsageError(`--pipeline must be 1f1b or gpipe, got ${JSON.stringify(v.pipeline)}`)
    patch.topology.schedule = v.pipeline
  }
  if (v.codec !== undefined) {
    const given = base.train?.compression
    patch.train.compression = { ...(typeof given === "string" ? { codec: given } : given), codec: codecFromFlag(v.codec)! }
  }
  if (typeof v.jobName === "string") patch.job = v.jobName
  const merged: Record<string, any> = { ...base, train: { ...base.train, ...patch.train }, topology: { ...base.topology, ...patch.topology } }
  if (patch.job) merged.job = patch.job
  // a file's schedule horizon follows a --steps override unless the file set it apart
  if (steps && merged.schedule && "totalSteps" in merged.schedule && merged.schedule.totalSteps === base.train?.steps) {
    merged.schedule = { ...merged.schedule, totalSteps: steps }
  }
  return resolveJob(merged, file ?? "job")
}

const parse = (args: string[], options: ParseArgsConfig["options"]): { values: Record<string, any>; positionals: string[] } =>
  parseArgs({ args, options: { ...COMMON, ...options }, allowPositionals: true, strict: true })

export const main = async (argv: string[]): Promise<void> => {
  const [cmd, ...rest] = argv
  if (!cmd || cmd === "--help" || cmd === "-h" || cmd === "help") {
    process.stdout.write(HELP.main)
    return
  }
  try {
    switch (cmd) {
      case "start": {
        const { values: v, positionals } = parse(rest, {})
        if (v.help) return void process.stdout.write(HELP.start)
        const job = jobFromArgs(positionals[0], v)
        const { startEmbedded } = await import("./start.ts")
        const sample = v.sample === undefined ? 200 : Number(v.sample)
        runMain(startEmbedded({ job, backend: v.backend as BackendPreference | undefined, json: v.json === true, sample }), "Warn")
        return
      }
      case "up": {
        const { values: v, positionals } = parse(rest, {
          nats: { type: "string" },
          account: { type: "string" },
          "max-restarts": { type: "string" },
          "restart-window": { type: "string" }
        })
        if (v.help) return void process.stdout.write(HELP.up)
        const job = jobFromArgs(positionals[0], v)
        const restarts = restartPolicyFromArgs(v)
        if (v.account !== undefined && v.nats === undefined) throw new UsageError("--account DIR is for a server given with --nats (up's own server makes its own users)")
        const given = Object.keys(AUTH_OPTIONS).filter((k) => v[k] !== undefined)
        if (v.nats === undefined && given.length > 0) throw new UsageError(`--${given[0]} is for a server given with --nats (up's own server makes its own users)`)
        const auth = v.nats === undefined ? undefined : authFromArgs(v)
        const { up } = await import("./up.ts")
        const sample = v.sample === undefined ? 200 : Number(v.sample)
        runMain(up({ job, jobFile: positionals[0], nats: v.nats, json: v.json === true, codec: v.codec, backend: v.backend, sample, restarts, auth, account: v.account }), "Warn")
        return
      }
      case "launch": {
        const { values: v, positionals } = parse(rest, {
          nats: { type: "string" },
          id: { type: "string" },
          shard: { type: "string" },
          stage: { type: "string" },
          replica: { type: "string" },
          relay: { type: "string" },
          "no-resume": { type: "boolean" },
          "min-workers": { type: "string" }
        })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP.launch)
        const { launch } = await import("./launch.ts")
        runMain(launch({ role: positionals[0], values: v }), "Info")
        return
      }
      case "classify": {
        const { values: v, positionals } = parse(rest, { file: { type: "string" } })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP.classify)
        const { classifyMain } = await import("./classify.ts")
        await classifyMain({ checkpoint: positionals[0], texts: positionals.slice(1), file: v.file, json: v.json === true, backend: v.backend as BackendPreference | undefined })
        return
      }
      case "export": {
        const { values: v, positionals } = parse(rest, { safetensors: { type: "string" } })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP.export)
        const { exportMain } = await import("./export.ts")
        await exportMain({ checkpoint: positionals[0], safetensors: v.safetensors, json: v.json === true })
        return
      }
      case "merge-lora": {
        const { values: v, positionals } = parse(rest, { out: { type: "string" } })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP["merge-lora"])
        const { mergeLoraMain } = await import("./export.ts")
        await mergeLoraMain({ checkpoint: positionals[0], out: v.out, json: v.json === true })
        return
      }
      case "quantize": {
        const { values: v, positionals } = parse(rest, { mode: { type: "string" }, "calib-batches": { type: "string" }, out: { type: "string" }, nats: { type: "string" } })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP.quantize)
        const { quantizeMain } = await import("./quantize.ts")
        await quantizeMain({ checkpoint: positionals[0], mode: v.mode, calibBatches: v["calib-batches"], out: v.out, job: v.job, json: v.json === true, backend: v.backend as BackendPreference | undefined, nats: v.nats, auth: authFromArgs(v) })
        return
      }
      case "generate": {
        const { values: v, positionals } = parse(rest, { prompt: { type: "string" }, tokens: { type: "string" }, temperature: { type: "string" }, "top-k": { type: "string" }, seed: { type: "string" } })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP.generate)
        const { generateMain } = await import("./generate.ts")
        await generateMain({ source: positionals[0], prompt: v.prompt, tokens: v.tokens, temperature: v.temperature, topK: v["top-k"], seed: v.seed, json: v.json === true, backend: v.backend as BackendPreference | undefined })
        return
      }
      case "infra": {
        const { values: v, positionals } = parse(rest, { out: { type: "string" }, shards: { type: "string" }, workers: { type: "string" }, force: { type: "boolean" }, "env-refs": { type: "boolean" } })
        if (v.help || positionals.length === 0) return void process.stdout.write(HELP.infra)
        const { infraMain } = await import("./infra.ts")
        infraMain({ command: positionals[0], args: positionals.slice(1), out: v.out, shards: v.shards, ...(v.workers !== undefined ? { workers: v.workers } : {}), jobFile: v.job, force: v.force === true, envRefs: v["env-refs"] === true })
        return
      }
      case "ctl": {
        const { ctlMain } = await import("./ctl.ts")
        await ctlMain(rest)
        return
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(cmd)}\n\n${HELP.main}`)
    }
  } catch (e) {
    process.stderr.write(`flotilla: ${(e as Error).message}\n`)
    process.exit(2)
  }
}

