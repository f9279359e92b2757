// LocalExchange: lets the ranks of one process exchange through memory instead of a transport.
//
// A daemon serves several ranks of a node, and a group's ranks on that node (its layers on
// that daemon) are communicators of one process. Given the same LocalExchange (through
// BootstrapOptions::local_exchange), such ranks recognise each other at bootstrap, and every
// collective message between them is a single memcpy from the sender's buffer into the
// receiver's, done by whichever of the two arrives second. Messages to other processes still go
// over UCX, as do the small "gave up" notices, so failure handling is unchanged; a rank of the
// same process cannot die alone, and one that stops answering is a timeout as before.
//
// Its owner (the daemon's top level; a test) creates one and hands it to every bootstrap of the
// process. Ranks bootstrapped without it, or with different ones, use UCX between them.
//
// Thread-safety: shared by every rank of the process; all of its use is internal and locked.
#pragma once

#include <cstdint>
#include <memory>

namespace tutel::comm {

namespace ucx {
class LocalHub;
}

class LocalExchange {
 public:
  LocalExchange();
  ~LocalExchange();
  LocalExchange(const LocalExchange&) = delete;
  LocalExchange& operator=(const LocalExchange&) = delete;

  // Random, so that ranks of different processes (or exchanges) never match by accident.
  uint64_t token() const { return token_; }
  ucx::LocalHub& hub() { return *hub_; }

 private:
  uint64_t token_;
  std::unique_ptr<ucx::LocalHub> hub_;
};

}  // namespace tutel::comm
