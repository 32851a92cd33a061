// Implements: `acquireNats()` — a real NATS server for integration tests, never a mock.
// Order: $NATS_URL (kind "env"); a testcontainers container when a Docker/Podman engine
// answers within ~2 s ("container"); the local nats-server binary ("binary"); else it
// throws, saying how to get one. It never skips silently. Logs once which kind it used.
// Does not own: the server process itself (shared/bus/local-server.ts), the bus.
//
//   const nats = await acquireNats()            // in beforeAll
//   NatsBus.layer({ servers: nats.url })
//   await nats.stop()                           // in afterAll (a no-op for "env")
//
// `restartable: true` skips $NATS_URL (a server we do not own cannot be restarted).
// FLOTILLA_TEST_NATS=binary|container forces a kind.
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { findNatsServerBinary, startLocalNatsServer } from "../../shared/bus/local-server.ts"

export type NatsKind = "env" | "container" | "binary"

export interface AcquiredNats {
  readonly url: string
  readonly kind: NatsKind
  stop(): Promise<void>
  /** Restart on the same URL (container and binary kinds). */
  restart?(): Promise<void>
}

export interface AcquireNatsOptions {
  /** Needs restart(): never uses $NATS_URL. */
  readonly restartable?: boolean
  /** Server max_payload in bytes (binary kind; containers run the image's default). */
  readonly maxPayload?: number
  readonly jetstream?: boolean
}

const CONTAINER_IMAGE = "nats:2.10-alpine"
const announced = new Set<NatsKind>()

const announce = (kind: NatsKind, url: string) => {
  if (announced.has(kind)) return
  announced.add(kind)
  console.info(`[test/support/nats] using NATS kind=${kind} at ${url}`)
}

export const acquireNats = async (opts: AcquireNatsOptions = {}): Promise<AcquiredNats> => {
  const forced = process.env["FLOTILLA_TEST_NATS"]
  const envUrl = process.env["NATS_URL"]
  if (forced === undefined && opts.restartable !== true && envUrl !== undefined && envUrl !== "") {
    announce("env", envUrl)
    return { url: envUrl, kind: "env", stop: async () => {} }
  }
  if (forced !== "binary" && (forced === "container" || (await containerRuntimeAnswers()))) {
    const acquired = await startContainer(opts)
    announce("container", acquired.url)
    return acquired
  }
  if (findNatsServerBinary() !== undefined) {
    const server = await startLocalNatsServer({
      port: 0,
      maxPayload: opts.maxPayload,
      jetstream: opts.jetstream
    })
    announce("binary", server.url)
    return { url: server.url, kind: "binary", stop: () => server.stop(), restart: () => server.restart() }
  }
  throw new Error(
    "No NATS server for integration tests. Any one of these works:\n" +
      "  - apt-get install -y nats-server      (the tests start the binary themselves)\n" +
      "  - start Docker or Podman              (the tests start a " + CONTAINER_IMAGE + " container)\n" +
      "  - export NATS_URL=nats://host:4222    (use a running server)"
  )
}

/** True when a Docker-compatible engine answers GET /_ping within 2 s. */
const containerRuntimeAnswers = async (): Promise<boolean> => {
  const target = dockerEndpoint()
  if (target === undefined) return false
  return new Promise((resolve) => {
    const req = http.get({ ...target, path: "/_ping", timeout: 2_000 }, (res) => {
      res.resume()
      resolve(res.statusCode === 200)
    })
    req.on("timeout", () => {
      req.destroy()
      resolve(false)
    })
    req.on("error", () => resolve(false))
  })
}

const dockerEndpoint = (): { socketPath: string } | { host: string; port: number } | undefined => {
  const dockerHost = process.env["DOCKER_HOST"]
  if (dockerHost !== undefined && dockerHost !== "") {
    if (dockerHost.startsWith("unix://")) return existing(dockerHost.slice("unix://".length))
    if (dockerHost.startsWith("tcp://")) {
      const u = new URL(dockerHost.replace(/^tcp:/, "http:"))
      return { host: u.hostname, port: Number(u.port || 2375) }
    }
    return undefined
  }
  const runtimeDir = process.env["XDG_RUNTIME_DIR"]
  const candidates = [
    "/var/run/docker.sock",
    path.join(os.homedir(), ".docker/run/docker.sock"),
    ...(runtimeDir !== undefined ? [path.join(runtimeDir, "docker.sock"), path.join(runtimeDir, "podman/podman.sock")] : []),
    "/run/podman/podman.sock"
  ]
  for (const c of candidates) {
    const e = existing(c)
    if (e !== undefined) return e
  }
  return undefined
}

const existing = (socketPath: string) => (fs.existsSync(socketPath) ? { socketPath } : undefined)

/** A NATS container bound to a fixed host port, so restart() keeps the URL. */
const startContainer = async (opts: AcquireNatsOptions): Promise<AcquiredNats> => {
  const { GenericContainer, Wait } = await import("testcontainers")
  const hostPort = await freePort()
  const container = await new GenericContainer(CONTAINER_IMAGE)
    .withCommand(opts.jetstream === true ? ["-js"] : [])
    .withExposedPorts({ container: 4222, host: hostPort })
    .withWaitStrategy(Wait.forLogMessage(/Server is ready/))
    .withStartupTimeout(60_000)
    .start()
  const url = `nats://${container.getHost()}:${hostPort}`
  return {
    url,
    kind: "container",
    stop: async () => {
      await container.stop()
    },
    restart: async () => {
      await container.restart()
      await waitForPort(container.getHost(), hostPort)
    }
  }
}

const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.once("error", reject)
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address()
      const port = typeof addr === "object" && addr !== null ? addr.port : 0
      srv.close(() => resolve(port))
    })
  })

const waitForPort = async (host: string, port: number, timeoutMs = 30_000): Promise<void> => {
  const deadline = Date.now() + timeoutMs
  while (true) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host, port })
      s.once("connect", () => {
        s.destroy()
        resolve(true)
      })
      s.once("error", () => {
        s.destroy()
        resolve(false)
      })
    })
    if (ok) return
    if (Date.now() > deadline) throw new Error(`NATS container did not accept connections on ${host}:${port}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}
