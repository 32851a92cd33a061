// Implements: the control plane across processes — `flotilla up` runs a tiny GPT job as
// separate processes over a real NATS server (JetStream on), and `flotilla ctl` steers it:
// set-lr is accepted (exit 0), a negative LR is rejected with the reason (exit 1), status
// prints the topology table, history lists the accepted change with its sender, and
// `stop` makes every actor exit cleanly: the parameter server checkpoints, `flotilla up`
// finishes with exit code 0 and its summary, and no controller answers afterwards. And an
// actor whose `flotilla up` is SIGKILLed stops by itself, cleanly (a `leaving` beat, exit 0).
// Run: npx vitest run test/control.stop.test.ts
// Does not own: in-process control behaviour (test/control.test.ts).
import { spawn } from "node:child_process"
import { existsSync, mkdtempSync, readdirSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { connect } from "nats"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"
import { uniqueJob } from "./support/control-job.ts"

const BIN = resolve(dirname(fileURLToPath(import.meta.url)), "..", "bin", "flotilla.ts")

let nats: AcquiredNats
beforeAll(async () => {
  nats = await acquireNats({ jetstream: true })
})
afterAll(async () => {
  await nats?.stop()
})

interface Done {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

const run = (args: string[], cwd: string, timeoutMs = 60_000) => {
  const proc = spawn(process.execPath, [BIN, ...args], { cwd, env: { ...process.env, FLOTILLA_LOG: "warn" }, stdio: ["ignore", "pipe", "pipe"] })
  let stdout = ""
  let stderr = ""
  proc.stdout.on("data", (b) => void (stdout += b))
  proc.stderr.on("data", (b) => void (stderr += b))
  const done = new Promise<Done>((res) => {
    const t = setTimeout(() => proc.kill("SIGKILL"), timeoutMs)
    proc.once("exit", (code) => {
      clearTimeout(t)
      res({ code, stdout, stderr })
    })
  })
  return { proc, done, out: () => stdout }
}

const ctl = (cwd: string, job: string, ...args: string[]) => run(["ctl", job, ...args, "--nats", nats.url, "--sender", "ops-alice"], cwd, 30_000).done

describe("flotilla ctl against flotilla up", () => {
  it("set-lr, a rejected set-lr, status and history; stop ends every process with exit code 0", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "flotilla-ctl-stop-"))
    const job = uniqueJob("ctl-up")
    const ckpt = join(cwd, "checkpoints")
    const file = join(cwd, "job.json")
    writeFileSync(
      file,
      JSON.stringify({
        job,
        model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
        data: { batchSize: 4, valBatches: 1 },
        train: { steps: 100_000, evalEvery: 0, checkpointEvery: 0, checkpointDir: ckpt, heartbeatMs: 200, livenessMs: 3_000 },
        schedule: { kind: "constant", lr: 1e-3 }
      })
    )
    const up = run(["up", file, "--nats", nats.url, "--json", "--sample", "0"], cwd, 80_000)
    try {
      // wait until the job trains (3 versions applied), listening like any NATS client
      const nc = await connect({ servers: nats.url })
      try {
        const sub = nc.subscribe(`flotilla.${job}.ps.0.applied`, { max: 3 })
        for await (const _ of sub) void _
      } finally {
        await nc.close()
      }

      // the first round runs concurrently (only the accepted set-lr goes into the history)
      const [status, accepted, rejected] = await Promise.all([ctl(cwd, job, "status"), ctl(cwd, job, "set-lr", "5e-4"), ctl(cwd, job, "set-lr", "-1")])
      expect(status.code, status.stderr).toBe(0)
      expect(status.stdout).toMatch(/ROLE\s+ID\s+HOST\s+HEARTBEAT\s+STATE/)
      for (const id of ["loader-0", "scheduler-0", "ps-0", "worker-0"]) expect(status.stdout).toMatch(new RegExp(`\\n\\w+\\s+${id}\\s+\\S+\\s+[\\d.]+s ago\\s+running`))
      expect(status.stdout).toMatch(/version\s+\d+/)

      expect(accepted.code, accepted.stderr).toBe(0)
      expect(accepted.stdout).toMatch(/set-lr: accepted \(#1/)

      expect(rejected.code).toBe(1)
      expect(rejected.stderr).toContain("rejected (invalid-value): lr must be a finite number >= 0, got -1")

      const history = await ctl(cwd, job, "history")
      expect(history.code, history.stderr).toBe(0)
      expect(history.stdout).toContain("history in jetstream")
      expect(history.stdout).toMatch(/1\s+\d{4}-\d\d-\d\dT[\d:.]+Z\s+ops-alice\s+set-lr\s+\{"lr":0\.0005\}/)
      expect(history.stdout).not.toContain('"lr":-1')

      const stop = await ctl(cwd, job, "stop")
      expect(stop.code, stop.stderr).toBe(0)
      expect(stop.stdout).toMatch(/stop: accepted \(#2/)

      const ended = await up.done
      expect(ended.code, ended.stderr.slice(-2_000)).toBe(0)
      const summary = JSON.parse(ended.stdout.trim().split("\n").at(-1)!)
      expect(summary.job).toBe(job)
      expect(summary.steps).toBeGreaterThan(0)
      const dir = join(ckpt, job, "ps-0")
      expect(existsSync(dir) && readdirSync(dir).some((f) => f.endsWith(".ckpt"))).toBe(true)

      const after = await ctl(cwd, job, "status")
      expect(after.code).toBe(1)
      expect(after.stderr).toContain("no controller answered")
    } finally {
      up.proc.kill("SIGTERM")
    }
  }, 90_000)
})

describe("an actor of flotilla up outlives it by about a second", () => {
  it("stops cleanly (exit 0, its leaving heartbeat sent) once its supervisor is gone", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "flotilla-orphan-"))
    const job = uniqueJob("orphan")
    const file = join(cwd, "job.json")
    writeFileSync(file, JSON.stringify({ job, model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 }, data: { batchSize: 4 }, train: { steps: 10, heartbeatMs: 200 } }))
    // a stand-in for up: a shell that starts the loader as its child (FLOTILLA_SUPERVISOR_PID is the shell's pid) and waits
    const sh = spawn("sh", ["-c", `FLOTILLA_SUPERVISOR_PID=$$ "${process.execPath}" "${BIN}" launch loader --job "${file}" --nats ${nats.url} --id loader-0 & echo $!; wait`], { cwd, stdio: ["ignore", "pipe", "pipe"] })
    const childPid = await new Promise<number>((res) => sh.stdout.once("data", (b) => res(Number(String(b).trim()))))
    const nc = await connect({ servers: nats.url })
    try {
      const beats: string[] = []
      const sub = nc.subscribe(`flotilla.${job}.hb.loader.loader-0`, { callback: (_e, m) => void beats.push(JSON.parse(new TextDecoder().decode(m.data)).state) })
      const alive = () => { try { process.kill(childPid, 0); return true } catch { return false } }
      for (let i = 0; i < 200 && beats.length === 0; i++) await new Promise((r) => setTimeout(r, 100))
      expect(beats.length, "the loader heartbeats").toBeGreaterThan(0)
      sh.kill("SIGKILL") // up is gone; the loader is re-parented
      const t0 = Date.now()
      while (alive() && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 100))
      expect(alive(), "the loader stopped").toBe(false)
      expect(Date.now() - t0).toBeLessThan(10_000)
      await nc.flush()
      expect(beats.at(-1), `its last beats: ${beats.slice(-3).join(" ")}`).toBe("leaving")
      sub.unsubscribe()
    } finally {
      await nc.close()
      try { process.kill(childPid, "SIGKILL") } catch {}
    }
  }, 40_000)
})
