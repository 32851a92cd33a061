// The deployment files agree with the code: no Docker engine or cluster runs here, so
// this checks that they parse, that every actor command names a real role and a job
// file that loads, and that ports and endpoints line up. nats.conf is checked by
// nats-server itself (`-t`).
import { execFileSync } from "node:child_process"
import { readFileSync } from "node:fs"
import { describe, expect, it } from "vitest"
import { parse, parseAllDocuments } from "yaml"
import { loadJobFile, resolveJob } from "../shared/config/job.ts"
import { findNatsServerBinary } from "../shared/bus/local-server.ts"
import { ROLES } from "../cli/launch.ts"

describe("infra/docker-compose.yml", () => {
  const compose = parse(readFileSync("infra/docker-compose.yml", "utf8"), { merge: true })
  const actors = Object.entries<any>(compose.services).filter(([, s]) => Array.isArray(s.command) && s.command[0] === "launch")

  it("runs every role of a data-parallel job", () => {
    const roles = new Set(actors.map(([, s]) => s.command[1]))
    for (const r of ["loader", "scheduler", "param-server", "worker", "evaluator"]) expect(roles).toContain(r)
    for (const r of roles) expect(ROLES as readonly string[]).toContain(r)
  })

  it("points every actor at a job file that loads, and covers its parameter-server shards", () => {
    const files = new Set(actors.map(([, s]) => s.command[s.command.indexOf("--job") + 1]))
    expect(files.size).toBe(1)
    const job = loadJobFile([...files][0])
    const shards = actors.filter(([, s]) => s.command[1] === "param-server").map(([, s]) => Number(s.command[s.command.indexOf("--shard") + 1]))
    expect(shards.sort()).toEqual(Array.from({ length: job.topology.psShards }, (_, k) => k))
  })

  it("wires NATS and Jaeger's OTLP endpoint consistently", () => {
    const env = actors[0][1].environment
    expect(env.NATS_URL).toBe("nats://nats:4222")
    expect(compose.services.nats.ports).toContain("4222:4222")
    const otlp = new URL(env.OTEL_EXPORTER_OTLP_ENDPOINT)
    expect(otlp.hostname).toBe("jaeger")
    expect(compose.services.jaeger.ports).toContain(`${otlp.port}:${otlp.port}`)
    expect(compose.services.jaeger.environment.COLLECTOR_OTLP_ENABLED).toBe("true")
    expect(compose.services.nats.image).toMatch(/^nats:/)
    expect(compose.services.jaeger.image).toMatch(/^jaegertracing\/all-in-one:/)
  })
})

describe("infra/nats/nats.conf", () => {
  it("is valid for nats-server and isolates the job in its own account", () => {
    const bin = findNatsServerBinary()
    if (!bin) throw new Error("nats-server not found: apt-get install -y nats-server")
    const out = execFileSync(bin, ["-t", "-c", "infra/nats/nats.conf"], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })
    expect(out + "").toBeDefined()
    const text = readFileSync("infra/nats/nats.conf", "utf8")
    expect(text).toMatch(/JOB_GPT/)
    expect(text).toMatch(/"flotilla\.gpt\.>"/)
  })
})

describe("infra/nats/cluster (3 nodes)", () => {
  const nodes = [1, 2, 3].map((i) => `infra/nats/cluster/nats-${i}.conf`)
  const accounts = (text: string) => text.slice(text.indexOf("accounts {"))

  it("each node's config is valid for nats-server, with a unique name and routes to all three", () => {
    const bin = findNatsServerBinary()
    if (!bin) throw new Error("nats-server not found: apt-get install -y nats-server")
    const names = new Set<string>()
    for (const file of nodes) {
      execFileSync(bin, ["-t", "-c", file], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })
      const text = readFileSync(file, "utf8")
      names.add(/^server_name:\s*(\S+)/m.exec(text)![1])
      expect(text).toMatch(/include \.\/common\.conf/)
      expect(text).toMatch(/name: flotilla/)
      for (const peer of [1, 2, 3]) expect(text).toMatch(new RegExp(`nats-route://[^\\s]*@nats-${peer}:6222`))
    }
    expect([...names].sort()).toEqual(["nats-1", "nats-2", "nats-3"])
  })

  it("carries the same job accounts as the single-server nats.conf", () => {
    expect(accounts(readFileSync("infra/nats/cluster/common.conf", "utf8"))).toBe(accounts(readFileSync("infra/nats/nats.conf", "utf8")))
  })

  it("is wired into docker-compose's `cluster` profile", () => {
    const compose = parse(readFileSync("infra/docker-compose.yml", "utf8"), { merge: true })
    for (const i of [1, 2, 3]) {
      const svc = compose.services[`nats-${i}`]
      expect(svc.profiles).toEqual(["cluster"])
      expect(svc.command).toEqual(["-c", `/etc/nats/cluster/nats-${i}.conf`])
    }
  })
})

describe("infra/k8s/flotilla-job.yaml", () => {
  const docs = parseAllDocuments(readFileSync("infra/k8s/flotilla-job.yaml", "utf8")).map((d) => d.toJS())
  it("parses, and its job ConfigMap resolves", () => {
    const cm = docs.find((d) => d.kind === "ConfigMap")
    const job = resolveJob(parse(cm.data["job.yaml"]), "configmap")
    const ps = docs.find((d) => d.kind === "StatefulSet")
    expect(ps.spec.replicas).toBe(job.topology.psShards)
    const worker = docs.find((d) => d.kind === "Deployment" && d.metadata.name === "flotilla-worker")
    expect(worker.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"]).toBe(1)
  })
})
