// One connection to the daemon: a client session (hello, arena, request ring worker, control
// frames) or an admin session (admin frames only).
//
// Threads: the event loop owns the socket and the control frames; a client session also has one
// worker thread that consumes its request ring and runs forward/backward on the layers.
#pragma once

#include <uv.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "device_regions.hpp"
#include "host_registration.hpp"
#include "tutel/ipc/arena.hpp"
#include "tutel/ipc/ring.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::daemon {

class DaemonImpl;

struct Session : std::enable_shared_from_this<Session> {
  DaemonImpl* daemon = nullptr;
  std::shared_ptr<Session> keep_alive;  // set while the poll handle closes
  uint64_t id = 0;
  bool admin = false;
  std::string tenant;  // client sessions
  std::string client_name;  // what its hello said it is (tutelctl sessions)
  std::chrono::steady_clock::time_point connected_at = std::chrono::steady_clock::now();
  ipc::PeerCredentials peer{};
  ipc::UniqueFd fd;
  uv_poll_t poll{};
  ipc::FrameDecoder decoder;

  // Control frames run one at a time, in order; the decoded ones wait here (DaemonImpl::pump).
  std::deque<ipc::Frame> queued;
  size_t queued_bytes = 0;  // the queued frames' bodies
  bool reading_paused = false;  // the queue is full: the socket is not polled until it drains
  // Replies the socket has not taken yet (the client is slow to read); written from the loop
  // when the socket is writable again, never waited for.
  ipc::FrameQueue replies;
  int poll_events = 0;  // what `poll` waits for now (UV_READABLE | UV_WRITABLE)
  bool pumping = false;         // inside DaemonImpl::pump (which a finished frame re-enters)
  bool busy = false;
  bool closing = false;
  // The client hung up (its end of the socket closed): it can read nothing more from the arena
  // or its regions, whose pages then go with them (SharedMemory::discard_pages).
  bool client_hung_up = false;
  // tuteld closed the session (set once, by close_session): what it lent stays until its client
  // lets go of the connection (client_hung_up), then goes (released), and the session with it.
  bool lingering = false;
  bool worker_exited = false;  // its worker thread has returned (the loop heard of it)
  // Its worker found the request ring's indices corrupt and returned; written before it exits.
  std::atomic<bool> ring_corrupt{false};
  bool torn_down = false;  // tear_down has finished its part on the pool
  bool released = false;

  // Client data path, after hello (the arena is created on the pool; the flag is set at once).
  bool hello_received = false;
  // Past its hello and its tenant's secret: counted against max_sessions from then on.
  bool admitted = false;
  // A client connection that has not yet sent a hello that passed (a hello that fails closes the
  // session; one that passes admits it before its arena is made).
  bool awaiting_hello() const { return !admin && !admitted && !closing; }
  std::optional<ipc::Arena> arena;
  // The arena's data region, registered with every rank's backend by the worker before its first
  // request, unregistered when the session closes. Declared after `arena`: it goes first.
  HostRegistration pinned;
  // Device memory the client maps too (kMapRegion); requests may address it instead of the arena.
  DeviceRegions regions;
  ipc::RingConsumer<ipc::RequestDescriptor> requests;
  ipc::RingProducer<ipc::CompletionDescriptor> completions;
  std::thread worker;
  std::atomic<bool> stop{false};
};

}  // namespace tutel::daemon
