// Checks: authentication and per-role permissions on real nats-servers running the configs
// Flotilla ships and generates (docs/SECURITY.md, shared/bus/permissions.ts):
//   - infra/nats/nats.conf itself (job gpt, its nkeys from `flotilla infra account gpt
//     --shards 2`, on a free port with a temp JetStream store): anonymous clients and
//     unknown keys are refused; a worker cannot publish params, control events, a parameter
//     server's heartbeat or acks; a parameter server cannot heartbeat as another shard; an
//     observer cannot stop the job (or swallow control requests in the controller's queue
//     group) but can ask status; nobody but the scheduler can serve `lr`, and nobody can
//     inject a reply into another client's request inbox; JetStream: the controller keeps
//     its history and the parameter servers their checkpoints under their own users, but
//     nobody deletes a stream;
//   - two generated accounts (jobs alpha and beta) on one server: neither job's users can
//     read or write the other's subjects, inboxes or JetStream;
//   - the CLI side: a bad creds file is an error naming it, a creds file and an nkey file
//     authenticate, flags win over the environment; TLS with client certificates (the test
//     certificates in test/fixtures/tls) admits a role that presents them, nobody else;
//   - one user per actor (what `flotilla up` makes): a worker cannot heartbeat as another
//     (drop it with a `leaving` beat, or keep it alive), hear another's acks, or speak in
//     another replica's pipeline;
//   - `flotilla up` with its own generated credentials runs a tiny job to completion, its
//     server refuses anonymous clients, and its operator key pauses, lists the (JetStream)
//     history and resumes the job.
// Every refusal is paired with the allowed role doing the same thing (so each check can fail).
// Run: npx vitest run test/security.permissions.test.ts   (~30 s on 2 cores)
import { spawn } from "node:child_process"
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { connect, type NatsConnection } from "nats"
import { Effect, Layer, References, Result } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { startLocalNatsServer, type LocalNatsServer } from "../shared/bus/local-server.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { NatsBus, natsConnectAuth, type NatsAuth } from "../shared/bus/nats.ts"
import { accountBlock, type JobRole } from "../shared/bus/permissions.ts"
import { makeJetStreamStore } from "../shared/checkpoint/store.ts"
import { jetstreamHistory } from "../actors/controller/history.ts"
import { authFromArgs } from "../cli/auth.ts"
import { requestControl } from "../cli/ctl.ts"
import { writeAccount } from "../cli/infra.ts"
import { drillCorpus } from "./support/drill-job.ts"

const BIN = resolve(dirname(fileURLToPath(import.meta.url)), "..", "bin", "flotilla.ts")
const enc = (s: string) => new TextEncoder().encode(s)
const dec = (b: Uint8Array) => new TextDecoder().decode(b)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

let dir: string
let shipped: LocalNatsServer
let pair: LocalNatsServer
const open: NatsConnection[] = []

/** A connection as `role` of `job` (its seed from `flotilla infra account`), counting the server's permission refusals. */
const as = async (server: LocalNatsServer, job: string, role: JobRole) => {
  const nc = await connect({ servers: server.url, name: `${job}-${role}`, ...natsConnectAuth({ nkey: join(dir, job, `${role}.nk`) }) })
  open.push(nc)
  const refusals: string[] = []
  void (async () => {
    for await (const s of nc.status()) if (s.type === "error" && s.data === "PERMISSIONS_VIOLATION") refusals.push(String(s.data))
  })()
  return { nc, refusals }
}
type Client = Awaited<ReturnType<typeof as>>

/** Subscribe `watcher` to `subject`, let `publisher` publish there; how many arrived and whether the server refused it. */
const publishes = async (publisher: Client, watcher: Client, subject: string) => {
  let got = 0
  const sub = watcher.nc.subscribe(subject, { callback: (err) => void (err === null && got++) })
  await watcher.nc.flush()
  const before = publisher.refusals.length
  publisher.nc.publish(subject, enc("spoof"))
  await publisher.nc.flush()
  await watcher.nc.flush()
  await sleep(60)
  sub.unsubscribe()
  return { delivered: got, refused: publisher.refusals.length > before }
}

/** Whether the server refuses `client` subscribing to `subject` (in `queue` when given). */
const subscribeRefused = async (client: Client, subject: string, queue?: string): Promise<boolean> => {
  let refused = false
  const sub = client.nc.subscribe(subject, { queue, callback: (err) => void (err !== null && (refused = true)) })
  await client.nc.flush()
  await sleep(40)
  if (!sub.isClosed()) sub.unsubscribe()
  return refused
}

/** A fake server of `subject` in `queue` that answers every request with `answer`. */
const serve = (client: Client, subject: string, queue: string, answer: string) =>
  client.nc.subscribe(subject, { queue, callback: (err, m) => void (err === null && m.respond(enc(answer))) })

const refusedWith = async (p: Promise<unknown>): Promise<string> => {
  try {
    await p
    return "allowed"
  } catch (e) {
    return String((e as { code?: string }).code ?? (e as Error).message)
  }
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "flotilla-security-"))
  // the shipped config reads job gpt's keys from the environment: make them, set them, start it as it is
  writeAccount("gpt", 2, join(dir, "gpt"))
  const env = readFileSync(join(dir, "gpt", "nkeys.env"), "utf8").trim().split("\n").map((l) => l.split("="))
  for (const [k, v] of env) process.env[k] = v
  try {
    shipped = await startLocalNatsServer({ baseConfig: "infra/nats/nats.conf", jetstream: true, storeDir: join(dir, "js-shipped"), httpPort: 0 })
  } finally {
    for (const [k] of env) delete process.env[k]
  }
  writeAccount("alpha", 1, join(dir, "alpha"))
  writeAccount("beta", 1, join(dir, "beta"))
  // as an operator adds jobs to a shared server: each job's account.conf included in accounts { }
  writeFileSync(join(dir, "pair.conf"), "accounts {\n  include ./alpha/account.conf\n  include ./beta/account.conf\n}\n")
  pair = await startLocalNatsServer({ baseConfig: join(dir, "pair.conf"), jetstream: true })
}, 30_000)

afterAll(async () => {
  await Promise.all(open.map((nc) => nc.close().catch(() => {})))
  await shipped?.stop()
  await pair?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

describe("infra/nats/nats.conf, as each of job gpt's roles", () => {
  it("refuses anonymous clients and unknown keys, and admits a role's key", async () => {
    expect(await refusedWith(connect({ servers: shipped.url, reconnect: false }))).toBe("AUTHORIZATION_VIOLATION")
    writeAccount("stranger", 1, join(dir, "stranger")) // keys the server never heard of
    expect(await refusedWith(connect({ servers: shipped.url, reconnect: false, ...natsConnectAuth({ nkey: join(dir, "stranger", "worker.nk") }) }))).toBe("AUTHORIZATION_VIOLATION")
    const w = await as(shipped, "gpt", "worker")
    expect(w.nc.isClosed()).toBe(false)
  })

  it("a worker cannot publish params, control events, acks or a server's heartbeat; their owners can", async () => {
    const observer = await as(shipped, "gpt", "observer")
    const worker = await as(shipped, "gpt", "worker")
    const ps0 = await as(shipped, "gpt", "ps-0")
    const ps1 = await as(shipped, "gpt", "ps-1")
    const scheduler = await as(shipped, "gpt", "scheduler")
    const p = "flotilla.gpt"
    const cases: Array<[string, Client, Client]> = [
      [`${p}.ps.0.version`, worker, ps0],
      [`${p}.events.control`, worker, scheduler],
      [`${p}.hb.ps.ps-0`, worker, ps0], // a spoofed heartbeat
      [`${p}.hb.ps.ps-0`, ps1, ps0], // one shard posing as another
      [`${p}.ps.0.ack.worker-1`, worker, ps0],
      [`${p}.ps.0.version`, ps1, ps0],
      [`${p}.ps.0.decided`, ps1, ps0]
    ]
    for (const [subject, spoofer, owner] of cases) {
      expect(await publishes(spoofer, observer, subject), `${subject} by the wrong role`).toEqual({ delivered: 0, refused: true })
      expect(await publishes(owner, observer, subject), `${subject} by its owner`).toEqual({ delivered: 1, refused: false })
    }
    // and what a worker does publish goes through
    expect(await publishes(worker, observer, `${p}.hb.worker.worker-0`)).toEqual({ delivered: 1, refused: false })
  })

  it("an observer cannot stop the job or join the controller's queue group; the operator can stop it; both get status", async () => {
    const controller = await as(shipped, "gpt", "scheduler")
    const stops: string[] = []
    controller.nc.subscribe("flotilla.gpt.control.*", {
      queue: "control",
      callback: (err, m) => {
        if (err !== null) return
        stops.push(m.subject)
        m.respond(enc(`ok ${m.subject}`))
      }
    })
    await controller.nc.flush()
    const observer = await as(shipped, "gpt", "observer")
    const operator = await as(shipped, "gpt", "operator")
    expect(await refusedWith(observer.nc.request("flotilla.gpt.control.stop", enc("{}"), { timeout: 1_000 }))).toBe("PERMISSIONS_VIOLATION")
    expect(stops).toEqual([])
    expect(dec((await operator.nc.request("flotilla.gpt.control.stop", enc("{}"), { timeout: 2_000 })).data)).toBe("ok flotilla.gpt.control.stop")
    expect(dec((await observer.nc.request("flotilla.gpt.control.status", enc("{}"), { timeout: 2_000 })).data)).toBe("ok flotilla.gpt.control.status")
    // it may watch control requests, never take them from the controller
    expect(await subscribeRefused(observer, "flotilla.gpt.control.*", "control")).toBe(true)
    expect(await subscribeRefused(observer, "flotilla.gpt.control.*")).toBe(false)
    expect(await subscribeRefused(operator, "flotilla.gpt.control.*", "control")).toBe(true)
  })

  it("only the scheduler answers lr: a worker can neither serve it nor inject an answer into a server's inbox", async () => {
    const worker = await as(shipped, "gpt", "worker")
    const ps0 = await as(shipped, "gpt", "ps-0")
    const ps1 = await as(shipped, "gpt", "ps-1")
    const scheduler = await as(shipped, "gpt", "scheduler")
    expect(await subscribeRefused(worker, "flotilla.gpt.lr", "scheduler")).toBe(true)
    expect(await subscribeRefused(worker, "flotilla.gpt.lr")).toBe(true)
    expect(await subscribeRefused(ps1, "flotilla.gpt.lr", "scheduler")).toBe(true)
    serve(scheduler, "flotilla.gpt.lr", "scheduler", "lr=0.001")
    await scheduler.nc.flush()
    // ps-0 asks with its own inbox; the worker sees the inbox (it may read _INBOX.> for its own requests) and tries to answer first
    const inbox = "_INBOX.ps0test.1"
    const answers: string[] = []
    ps0.nc.subscribe(inbox, { callback: (err, m) => void (err === null && answers.push(dec(m.data))) })
    await ps0.nc.flush()
    const spoof = await publishes(worker, ps0, inbox)
    expect(spoof.refused).toBe(true)
    const fromPeer = await publishes(ps1, ps0, inbox) // a responder may answer only what it was asked
    expect(fromPeer.refused).toBe(true)
    ps0.nc.publish("flotilla.gpt.lr", enc("GetLr"), { reply: inbox })
    await ps0.nc.flush()
    for (let i = 0; i < 40 && answers.length === 0; i++) await sleep(25)
    expect(answers).toEqual(["lr=0.001"])
  })

  it("JetStream: the controller keeps its history and the parameter servers their checkpoints; nobody deletes a stream", async () => {
    const auth = (role: JobRole): NatsAuth => ({ nkey: join(dir, "gpt", `${role}.nk`) })
    const entries = await Effect.runPromise(
      Effect.scoped(
        Effect.gen(function* () {
          const h = yield* jetstreamHistory("gpt", [shipped.url], auth("scheduler"))
          yield* h.append({ _tag: "ControlApplied", v: 1, job: "gpt", verb: "pause", command: { _tag: "PauseJob", v: 1, job: "gpt", sender: "ctl-t", requestId: "r-1" }, sender: "ctl-t", requestId: "r-1", by: "scheduler-0-controller", at: Date.now(), epoch: 0 } as never)
          return yield* h.list(10)
        })
      )
    )
    expect(entries.map((e) => e.seq)).toEqual([1])
    const versions = await Effect.runPromise(
      Effect.scoped(
        Effect.gen(function* () {
          const store = yield* makeJetStreamStore({ servers: shipped.url, auth: auth("ps-0"), keep: 2, retryForMs: 2_000 })
          for (const v of [1, 2, 3]) yield* store.save("gpt", 0, v, new Uint8Array(2_000).fill(v))
          const refs = yield* store.list("gpt", 0)
          const bytes = yield* store.load(refs.at(-1)!)
          return { versions: refs.map((r) => r.version), last: bytes[0] }
        })
      )
    )
    expect(versions).toEqual({ versions: [2, 3], last: 3 })
    // the history's own writer cannot delete or purge it, nor a server its checkpoint bucket; a worker has no JetStream at all
    const scheduler = await as(shipped, "gpt", "scheduler")
    const ps0 = await as(shipped, "gpt", "ps-0")
    const worker = await as(shipped, "gpt", "worker")
    const jsm = await scheduler.nc.jetstreamManager()
    expect(await refusedWith(jsm.streams.delete("FLOTILLA_gpt_CONTROL"))).toBe("PERMISSIONS_VIOLATION")
    expect(await refusedWith(jsm.streams.purge("FLOTILLA_gpt_CONTROL"))).toBe("PERMISSIONS_VIOLATION")
    const psJsm = await ps0.nc.jetstreamManager()
    expect(await refusedWith(psJsm.streams.delete("OBJ_flotilla-checkpoints"))).toBe("PERMISSIONS_VIOLATION")
    expect(await refusedWith(psJsm.streams.delete("FLOTILLA_gpt_CONTROL"))).toBe("PERMISSIONS_VIOLATION")
    expect(await refusedWith(worker.nc.jetstreamManager())).toBe("PERMISSIONS_VIOLATION")
    expect(await refusedWith(worker.nc.request("$JS.API.STREAM.DELETE.FLOTILLA_gpt_CONTROL", enc(""), { timeout: 1_000 }))).toBe("PERMISSIONS_VIOLATION")
    expect((await jsm.streams.info("FLOTILLA_gpt_CONTROL")).state.messages).toBe(1)
  })
})

describe("two jobs' accounts on one server", () => {
  it("alpha's users can neither read nor write beta's subjects; beta's own can", async () => {
    const alphaWorker = await as(pair, "alpha", "worker")
    const alphaObserver = await as(pair, "alpha", "observer")
    const betaWorker = await as(pair, "beta", "worker")
    const betaObserver = await as(pair, "beta", "observer")
    expect(await subscribeRefused(alphaObserver, "flotilla.beta.>")).toBe(true)
    expect(await subscribeRefused(alphaWorker, "flotilla.beta.ps.*.version")).toBe(true)
    expect(await subscribeRefused(alphaObserver, "flotilla.alpha.>")).toBe(false)
    expect(await publishes(alphaWorker, betaObserver, "flotilla.beta.hb.worker.worker-0")).toEqual({ delivered: 0, refused: true })
    expect(await publishes(betaWorker, betaObserver, "flotilla.beta.hb.worker.worker-0")).toEqual({ delivered: 1, refused: false })
  })

  it("isolates even what both may touch: inboxes and JetStream", async () => {
    const alphaObserver = await as(pair, "alpha", "observer")
    const betaObserver = await as(pair, "beta", "observer")
    const betaScheduler = await as(pair, "beta", "scheduler")
    const seen = { alpha: 0, beta: 0 }
    alphaObserver.nc.subscribe("_INBOX.>", { callback: () => void seen.alpha++ })
    betaObserver.nc.subscribe("_INBOX.>", { callback: () => void seen.beta++ })
    await alphaObserver.nc.flush()
    await betaObserver.nc.flush()
    serve(betaScheduler, "flotilla.beta.control.status", "control", "status")
    await betaScheduler.nc.flush()
    const operator = await as(pair, "beta", "operator")
    expect(dec((await operator.nc.request("flotilla.beta.control.status", enc("{}"), { timeout: 2_000 })).data)).toBe("status")
    await sleep(50)
    expect(seen).toEqual({ alpha: 0, beta: 1 })
    // beta's history stream is beta's: alpha's parameter server (which may list streams) does not see it
    await Effect.runPromise(Effect.scoped(jetstreamHistory("beta", [pair.url], { nkey: join(dir, "beta", "scheduler.nk") })))
    const names = async (job: string) => {
      const c = await as(pair, job, "ps-0")
      const out: string[] = []
      for await (const n of (await c.nc.jetstreamManager()).streams.names()) out.push(n)
      return out
    }
    expect(await names("beta")).toContain("FLOTILLA_beta_CONTROL")
    expect(await names("alpha")).not.toContain("FLOTILLA_beta_CONTROL")
  })
})

describe("credentials on the command line", () => {
  it("names a bad creds file; a creds file and an nkey file authenticate; a flag wins over the environment", async () => {
    const bad = join(dir, "bad.creds")
    writeFileSync(bad, "not a credentials file\n")
    expect(() => authFromArgs({ creds: bad }, {})).toThrow(`creds file ${bad}: not a NATS credentials file`)
    expect(() => authFromArgs({ creds: join(dir, "missing.creds") }, {})).toThrow(`creds file ${join(dir, "missing.creds")}: cannot read it (ENOENT)`)
    expect(() => authFromArgs({}, { NATS_NKEY: bad })).toThrow(`nkey file ${bad}: holds no nkey user seed`)
    expect(() => authFromArgs({ user: "u", token: "t" }, {})).toThrow("give one way to authenticate")
    expect(authFromArgs({ user: "u" }, { NATS_PASSWORD: "p", NATS_CREDS: bad })).toEqual({ user: "u", password: "p" })
    // a .creds file: the server (config mode, nkey users) checks its seed; in operator mode its JWT too
    const seed = readFileSync(join(dir, "gpt", "observer.nk"), "utf8").trim()
    const creds = join(dir, "observer.creds")
    writeFileSync(creds, `-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n${seed}\n------END USER NKEY SEED------\n`)
    for (const auth of [authFromArgs({ creds }, {}), authFromArgs({}, { NATS_NKEY: join(dir, "gpt", "observer.nk") })]) {
      const r = await Effect.runPromise(
        Effect.gen(function* () {
          const bus = yield* Bus
          return yield* bus.flush()
        }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: shipped.url, auth })), Effect.provide(Layer.succeed(References.MinimumLogLevel, "Error")), Effect.result)
      )
      expect(Result.isSuccess(r), JSON.stringify(auth)).toBe(true)
    }
  })
})

describe("TLS", () => {
  it("a server requiring client certificates admits a role with --tls-ca, --tls-cert and --tls-key, and nobody without", async () => {
    const tls = resolve(dirname(fileURLToPath(import.meta.url)), "fixtures", "tls")
    writeFileSync(join(dir, "tls.conf"), [
      `tls { cert_file: ${JSON.stringify(join(tls, "server.pem"))}, key_file: ${JSON.stringify(join(tls, "server-key.pem"))}, ca_file: ${JSON.stringify(join(tls, "ca.pem"))}, verify: true, timeout: 2 }`,
      "accounts {\n  include ./gpt/account.conf\n}\n"
    ].join("\n"))
    const server = await startLocalNatsServer({ baseConfig: join(dir, "tls.conf") })
    try {
      const connects = (v: Record<string, unknown>) =>
        Effect.runPromise(
          Effect.gen(function* () {
            return yield* (yield* Bus).flush()
          }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: server.url, auth: authFromArgs(v, {}), connectTimeoutMs: 2_000 })), Effect.provide(Layer.succeed(References.MinimumLogLevel, "Error")), Effect.result)
        ).then(Result.isSuccess)
      const nkey = join(dir, "gpt", "observer.nk")
      const ca = join(tls, "ca.pem")
      expect(await connects({ nkey, "tls-ca": ca, "tls-cert": join(tls, "client.pem"), "tls-key": join(tls, "client-key.pem") })).toBe(true)
      expect(await connects({ nkey, "tls-ca": ca }), "no client certificate").toBe(false)
      expect(await connects({ nkey }), "no TLS at all").toBe(false)
      expect(() => authFromArgs({ nkey, "tls-cert": join(tls, "client.pem") }, {})).toThrow("needs both a client certificate and its key")
    } finally {
      await server.stop()
    }
  })
})

describe("one user per actor (as flotilla up makes them)", () => {
  it("a worker heartbeats, hears acks and speaks in a pipeline only as itself and its replica; the others' own users can", async () => {
    // up's users: workers worker-0 and worker-1, the stage worker-0-s1 of replica worker-0, an observer
    const users = [
      { role: "worker" as const, member: { id: "worker-0" } },
      { role: "worker" as const, member: { id: "worker-1" } },
      { role: "worker" as const, member: { id: "worker-0-s1", replica: "worker-0" } },
      { role: "observer" as const }
    ].map((u) => ({ ...u, auth: { kind: "password" as const, user: u.member?.id ?? u.role, password: `pw-${u.member?.id ?? u.role}` } }))
    const server = await startLocalNatsServer({ extraConfig: `accounts {\n${accountBlock("gpt", users)}}\n` })
    try {
      const user = async (name: string): Promise<Client> => {
        const nc = await connect({ servers: server.url, user: name, pass: `pw-${name}` })
        open.push(nc)
        const refusals: string[] = []
        void (async () => {
          for await (const st of nc.status()) if (st.type === "error" && st.data === "PERMISSIONS_VIOLATION") refusals.push(String(st.data))
        })()
        return { nc, refusals }
      }
      const [w0, w1, s1, observer] = [await user("worker-0"), await user("worker-1"), await user("worker-0-s1"), await user("observer")]
      const p = "flotilla.gpt"
      // [subject, a member it is not, its owner]
      const cases: Array<[string, Client, Client]> = [
        [`${p}.hb.worker.worker-0`, w1, w0], // worker-1 cannot say worker-0 is leaving, nor keep it alive
        [`${p}.hb.worker.worker-1`, w0, w1],
        [`${p}.hb.stage.worker-0-s1`, w0, s1],
        [`${p}.pipe.worker-0.1.fwd`, w1, w0], // another replica's pipeline
        [`${p}.pipe.worker-0.0.bwd`, w1, s1],
        [`${p}.data.lease.worker-0`, w1, w0], // leasing as another
        [`${p}.data.ack.worker-0`, w1, w0] // giving back another's batches
      ]
      for (const [subject, other, owner] of cases) {
        expect(await publishes(other, observer, subject), `${subject} by another member`).toEqual({ delivered: 0, refused: true })
        expect(await publishes(owner, observer, subject), `${subject} by its owner`).toEqual({ delivered: 1, refused: false })
      }
      // acks: a worker's own, a stage's its replica's; nobody else's
      expect(await subscribeRefused(w0, `${p}.ps.0.ack.worker-1`)).toBe(true)
      expect(await subscribeRefused(w1, `${p}.ps.0.ack.worker-1`)).toBe(false)
      expect(await subscribeRefused(s1, `${p}.ps.1.ack.worker-1`)).toBe(true)
      expect(await subscribeRefused(s1, `${p}.ps.1.ack.worker-0`)).toBe(false)
      expect(await subscribeRefused(w1, `${p}.pipe.worker-0.1.fwd`)).toBe(true)
      expect(await subscribeRefused(s1, `${p}.pipe.worker-0.1.fwd`)).toBe(false)
      // what every worker does publish still goes through
      expect(await publishes(w1, observer, `${p}.ps.0.push.worker-1`)).toEqual({ delivered: 1, refused: false })
      // nor push as another: the subject names the sender, and the servers refuse a bundle naming another
      expect(await publishes(w0, observer, `${p}.ps.0.push.worker-1`)).toEqual({ delivered: 0, refused: true })
      expect(await publishes(s1, observer, `${p}.ps.1.push.worker-0`)).toEqual({ delivered: 1, refused: false }) // a stage pushes as its replica
    } finally {
      await server.stop()
    }
  })
})

describe("flotilla up with its own credentials", () => {
  it("runs a tiny job to completion; its server refuses anonymous clients; its operator key pauses, lists and resumes", async () => {
    const cwd = join(dir, "up")
    mkdirSync(cwd, { recursive: true })
    writeFileSync(join(cwd, "corpus.txt"), drillCorpus())
    const job = `secure-up-${process.pid}`
    writeFileSync(join(cwd, "job.json"), JSON.stringify({
      job,
      model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
      data: { corpus: join(cwd, "corpus.txt"), batchSize: 4, valFraction: 0, valBatches: 1 },
      train: { steps: 120, evalEvery: 0, checkpointEvery: 0, checkpointDir: join(cwd, "checkpoints"), heartbeatMs: 200, livenessMs: 2_000, leaseTimeoutMs: 3_000 },
      schedule: { kind: "constant", lr: 3e-3 },
      topology: { workers: 1, psShards: 1 }
    }))
    const up = spawn(process.execPath, [BIN, "up", "job.json", "--json", "--sample", "0"], {
      cwd,
      env: { ...process.env, FLOTILLA_LOG: undefined, NATS_URL: undefined, NATS_USER: "leaked", NATS_PASSWORD: "leaked" },
      stdio: ["ignore", "pipe", "pipe"]
    })
    let stdout = ""
    let stderr = ""
    up.stdout!.on("data", (b: Buffer) => (stdout += b.toString()))
    up.stderr!.on("data", (b: Buffer) => (stderr += b.toString()))
    const exited = new Promise<number | null>((r) => up.once("exit", (code) => r(code)))
    const ctl = (...args: string[]) =>
      new Promise<{ code: number | null; out: string }>((res) => {
        const p = spawn(process.execPath, [BIN, "ctl", job, ...args, "--json"], { cwd, env: { ...process.env, NATS_URL: undefined }, stdio: ["ignore", "pipe", "pipe"] })
        let out = ""
        p.stdout!.on("data", (b: Buffer) => (out += b.toString()))
        p.stderr!.on("data", (b: Buffer) => (out += b.toString()))
        p.once("exit", (code) => res({ code, out }))
      })
    try {
      for (let i = 0; i < 400 && !/started nats-server at/.test(stderr); i++) await sleep(50)
      const m = /started nats-server at (nats:\/\/127\.0\.0\.1:\d+) .*--nkey (\S+)`/.exec(stderr)
      expect(m, `up's stderr: ${stderr}`).not.toBeNull()
      const [, url, seed] = m!
      expect(await refusedWith(connect({ servers: url, reconnect: false }))).toBe("AUTHORIZATION_VIOLATION")
      // as its operator: wait for the controller, pause, read the history, resume
      const status = () =>
        Effect.runPromise(
          Effect.gen(function* () {
            return yield* requestControl(yield* Bus, job, "status", {}, { timeoutMs: 1_000 })
          }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: url, auth: { nkey: resolve(cwd, seed) } })), Effect.provide(Layer.succeed(References.MinimumLogLevel, "Error")), Effect.result)
        )
      let answered = false
      for (let i = 0; i < 200 && !answered; i++) answered = Result.isSuccess(await status()) || (await sleep(100), false)
      expect(answered, `the controller answers the operator${stderr}`).toBe(true)
      const nkeyArgs = ["--nats", url, "--nkey", resolve(cwd, seed)]
      expect((await ctl("pause", ...nkeyArgs)).code).toBe(0)
      const history = await ctl("history", ...nkeyArgs)
      expect(history.code, history.out).toBe(0)
      expect(JSON.parse(history.out)).toMatchObject({ _tag: "ControlHistory", store: "jetstream", entries: [{ verb: "pause" }] })
      expect((await ctl("resume", ...nkeyArgs)).code).toBe(0)
      const code = await Promise.race([exited, sleep(90_000).then(() => "timeout")])
      expect(code, `up's exit; stderr:\n${stderr.slice(-3_000)}`).toBe(0)
      expect(JSON.parse(stdout.trim().split("\n").pop()!).steps).toBe(120)
      // every actor had the rights it needed (a refusal, or a history fallen back to memory, would show here)
      expect(stderr).not.toMatch(/PERMISSIONS_VIOLATION|Permissions Violation|no JetStream|Authorization Violation/)
    } finally {
      // a failed run: up stops its actors and its server on SIGTERM (SIGKILL only if it will not)
      if (up.exitCode === null) {
        up.kill("SIGTERM")
        await Promise.race([exited, sleep(15_000)])
        up.kill("SIGKILL")
      }
    }
  }, 140_000)
})
