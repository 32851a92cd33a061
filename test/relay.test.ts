// Checks, over a real nats-server with every actor its own process:
//  1. the quantizer relay (actors/quantizer/relay.ts): two workers launched with `--relay r1`
//     push f32 to the relay, which sends one push per version and shard. Every version is
//     made of the relay's one combination (both shards the same batches), every batch is
//     applied exactly once, and the final params equal an in-process replay of the applied
//     batches (the direct-push maths: test/support/replay.ts) within 1e-5. Midway the relay
//     is SIGKILLed and relaunched: the job heals and the figures still hold.
//  2. `flotilla ctl <job> set-compression sign1` mid-run: the controller picks the version
//     F, and every push of every worker to every shard (read off the wire: each bundle's
//     manifest) is int8 below F and sign1 from F on; an unknown codec is refused with the
//     list of codecs, and nothing is lost (every batch applied once, up to where the test pauses the job). A
//     worker stopped and relaunched under sign1 gets its error-feedback residuals back.
// Run: npx vitest run test/relay.test.ts   (~40 s on 2 cores)
import { execFile } from "node:child_process"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"
import { connect } from "nats"
import { describe, expect, it } from "vitest"
import type { StepApplied } from "../shared/protocol/messages.ts"
import { useCluster, waitUntil } from "./support/cluster.ts"
import { replay, worstTensor } from "./support/replay.ts"

const BIN = resolve(dirname(fileURLToPath(import.meta.url)), "..", "bin", "flotilla.ts")
const run = promisify(execFile)

const tiny = (name: string, steps: number, train: Record<string, unknown> = {}) => ({
  job: name,
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: 2, valBatches: 1 },
  train: { steps, clipNorm: 0, evalEvery: 0, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 3_000, leaseTimeoutMs: 20_000, seed: 7, ...train },
  optimizer: { kind: "sgd", momentum: 0.9, weightDecay: 0.01 },
  schedule: { kind: "constant", lr: 0.1 },
  topology: { workers: 2, psShards: 2 }
})

/** Both shards applied the same batches in every version 1..steps, and no batch twice. */
const checkApplied = (appliedOf: (k: number) => StepApplied[], steps: number): StepApplied[] => {
  const out: StepApplied[] = []
  const seen = new Set<string>()
  for (let v = 1; v <= steps; v++) {
    // a version may be reported again by a restarted shard: the newest report counts
    const [a0, a1] = [0, 1].map((k) => appliedOf(k).filter((a) => a.version === v).at(-1))
    expect(a0, `shard 0 reported version ${v}`).toBeDefined()
    expect(a1?.batchIds, `version ${v}: shard 1 applied shard 0's batches`).toEqual(a0!.batchIds)
    for (const id of a0!.batchIds) {
      expect(seen.has(id), `batch ${id} applied twice`).toBe(false)
      seen.add(id)
    }
    out.push(a0!)
  }
  return out
}

describe("the quantizer relay", () => {
  const suite = useCluster()

  it("two relayed workers equal direct pushes under f32 (1e-5), and a relay killed mid-run heals", async () => {
    const STEPS = 14
    const { cluster, obs } = await suite.start(tiny("relay-eq", STEPS))
    cluster.spawnServices()
    const relay = cluster.spawn("quantizer", "q-r1", ["--relay", "r1"])
    await relay.waitForLine(/relay r1: serving/)
    cluster.spawn("worker", "worker-a", ["--relay", "r1"])
    cluster.spawn("worker", "worker-b", ["--relay", "r1"])
    await obs.until(() => obs.version() >= 4, 60_000, () => `version 4 (at ${obs.version()})\n${cluster.logs()}`)
    await relay.kill()
    const relaunched = cluster.spawn("quantizer", "q-r1-again", ["--relay", "r1"])
    await obs.until(() => obs.version() >= STEPS, 90_000, () => `version ${STEPS} after the relay's relaunch (at ${obs.version()})\n${cluster.logs()}`)
    const pulled = [await obs.pull(0), await obs.pull(1)]
    expect(pulled.map((p) => p.version)).toEqual([STEPS, STEPS])

    const versions = checkApplied((k) => obs.appliedOf(k), STEPS)
    // the servers saw one sender, the relay; most versions combine both workers' batches
    for (const a of versions) expect(a.contributors, `version ${a.version}`).toEqual(["relay-r1"])
    const both = versions.filter((a) => a.batchIds.length === 2).length
    expect(both, `versions made of both workers' batches: ${versions.map((a) => a.batchIds.length).join(" ")}`).toBeGreaterThanOrEqual(STEPS - 4)
    expect(relaunched.lines.some((l) => /joins the job as relay-r1/.test(l)), "the relaunched relay took over").toBe(true)

    const job = cluster.job
    const { model, params } = await replay(job, versions.map((a) => ({ version: a.version, batchIds: a.batchIds, lr: a.lr })))
    const got = new Map([...pulled[0].params, ...pulled[1].params])
    const worst = worstTensor(model.specs.map((s) => s.name), got, params)
    console.info(`[relay] worst relative error vs direct-push replay: ${worst.err.toExponential(2)} (${worst.name}); ${both}/${STEPS} versions of 2 workers`)
    expect(worst.err, worst.all.map((e) => `${e.name} ${e.err.toExponential(1)}`).join(", ")).toBeLessThan(1e-5)
  }, 180_000)

  it("set-compression mid-run switches every push of every sender at the version the controller chose", async () => {
    // the controller starts a switch about 2 s of progress ahead, so how far ahead depends on the
    // machine's speed: the job is long, and the test pauses it once it has seen what it checks
    const STEPS = 20_000
    const { cluster, obs } = await suite.start(tiny("relay-switch", STEPS, { compression: { codec: "int8", minElements: 64 } }))
    const job = cluster.job
    // every push on the wire: its manifest says sender, version, codec
    const nc = await connect({ servers: cluster.url })
    const pushes: Array<{ sender: string; version: number; codec: string; shard: number; at: number }> = []
    const sub = nc.subscribe(`flotilla.${job.job}.ps.*.push.*`)
    void (async () => {
      for await (const m of sub) {
        const raw = m.headers?.get("Flotilla-Manifest")
        if (!raw) continue
        const man = JSON.parse(raw)
        pushes.push({ sender: man.meta.sender, version: man.meta.version, codec: man.meta.codec, shard: Number(m.subject.split(".").at(-3)), at: Date.now() })
      }
    })()
    cluster.spawnServices()
    cluster.spawn("worker", "worker-a")
    cluster.spawn("worker", "worker-b")
    await obs.until(() => obs.version() >= 3, 60_000, () => `version 3 (at ${obs.version()})\n${cluster.logs()}`)
    const ctl = (...args: string[]) => run(process.execPath, [BIN, "ctl", job.job, ...args, "--nats", cluster.url, "--json"]).then((r) => ({ code: 0, out: r.stdout }), (e) => ({ code: e.code as number, out: `${e.stdout}${e.stderr}` }))

    const bad = await ctl("set-compression", "int3")
    expect(bad.code).toBe(1)
    expect(bad.out).toMatch(/int3/)
    expect(bad.out).toMatch(/sign1/) // the reason lists the codecs there are

    const before = obs.version()
    const ok = await ctl("set-compression", "sign1")
    expect(ok.code, ok.out).toBe(0)
    const hist = JSON.parse((await ctl("history")).out)
    const entry = hist.entries.find((e: { verb: string }) => e.verb === "set-compression")
    const from: number = entry.command.fromVersion
    // ahead of every version the job had made when the command was sent, by at least 2
    expect(from).toBeGreaterThanOrEqual(before + 2)
    // a worker restarted under sign1 keeps what it still owes: its residuals are saved on the way out and restored
    await obs.until(() => obs.version() >= from + 3, 60_000, () => `version ${from + 3} (at ${obs.version()})\n${cluster.logs()}`)
    await cluster.actors.find((a) => a.id === "worker-b")!.term()
    const again = cluster.spawn("worker", "worker-b")
    await again.waitForLine(/error-feedback residuals of [1-9]\d* tensors restored/, 30_000)
    const back = Date.now()
    const relaunchedPushed = () => [0, 1].every((k) => pushes.some((p) => p.sender === "worker-b" && p.shard === k && p.at >= back && p.version >= from))
    await obs.until(relaunchedPushed, 60_000, () => `the relaunched worker-b pushing to both shards (at ${obs.version()})\n${cluster.logs()}`)
    const paused = await ctl("pause")
    expect(paused.code, paused.out).toBe(0)
    // paused: no shard applies a version more; the figures are those of the last versions both applied
    let seen = -1
    await waitUntil(() => {
      const v = obs.version()
      const still = v === seen
      seen = v
      return still
    }, 30_000, () => "the paused job to stop making versions", 1_000)
    sub.unsubscribe()
    await nc.close()
    const last = Math.min(...[0, 1].map((k) => Math.max(0, ...obs.appliedOf(k).map((a) => a.version))))
    expect(last).toBeGreaterThan(from)

    checkApplied((k) => obs.appliedOf(k), last)
    const wrong = pushes.filter((p) => p.codec !== (p.version >= from ? "sign1" : "int8"))
    expect(wrong, `pushes under the wrong codec (switch at ${from})`).toEqual([])
    // (worker-b's relaunch is the same sender: the check covers both of its processes)
    for (const w of ["worker-a", "worker-b"]) for (const k of [0, 1]) {
      expect(pushes.some((p) => p.sender === w && p.shard === k && p.version < from), `${w} pushed int8 to shard ${k}`).toBe(true)
      expect(pushes.some((p) => p.sender === w && p.shard === k && p.version >= from), `${w} pushed sign1 to shard ${k}`).toBe(true)
    }
    for (const ps of cluster.actors.filter((a) => a.role === "param-server")) {
      expect(ps.lines.some((l) => l.includes(`gradient codec → sign1 from version ${from}`)), `${ps.id} switched at ${from}`).toBe(true)
    }
    console.info(`[relay] set-compression sign1 sent at version ${before}, chosen for version ${from}; paused at ${last}; ${pushes.length} pushes checked`)
  }, 180_000)
})
