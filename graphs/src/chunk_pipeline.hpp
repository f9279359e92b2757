// Adaptive pipelining (DESIGN §1, d): the expert phase of a step cut along the capacity into d
// chunks, each going to its experts (`in`, an all-to-all), through the expert FFNs (`compute`)
// and back (`out`, an all-to-all). With overlap, a worker thread issues the exchanges while the
// calling thread computes, so chunk j+1 travels to its experts and chunk j-1 travels back while
// chunk j's GEMMs run.
//
// The exchanges are collectives: every rank must issue them in one order. That order is fixed
// here and is the same with and without overlap:
//   in(0), then for j = 0 .. d-1: in(j+1) (when j+1 < d), out(j)
// and out(j) always follows compute(j). So a group whose ranks differ in whether they overlap
// still pairs every collective with its peers'. After a failure the order holds up to the
// failure only: the exchanges that remain are not issued (with overlap, one already under way
// finishes), so the peers' collectives fail or time out, as after any failed collective.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include "tutel/core/status.hpp"

namespace tutel::graphs {

using ChunkStage = std::function<Status(int chunk)>;

// On the calling thread, in the order above.
Status run_chunks_in_order(int chunks, const ChunkStage& in, const ChunkStage& compute,
                           const ChunkStage& out);

// A thread that issues a pipelined phase's exchanges. Made once per layer and kept (a thread per
// step would cost a start-up per step); idle, it sleeps on a condition variable.
// One pipelined phase at a time.
class ExchangeWorker {
 public:
  ExchangeWorker();
  ~ExchangeWorker();
  ExchangeWorker(const ExchangeWorker&) = delete;
  ExchangeWorker& operator=(const ExchangeWorker&) = delete;

  // The order above, `in` and `out` on the worker and `compute` on the calling thread. The first
  // failure stops both sides (the other side finishes the stage it is in) and is returned; the
  // exchanges after a failed one are not issued, as on the calling thread. A stage that throws
  // fails with Internal. Returns once the worker is idle again, so the stages may go then.
  Status run(int chunks, const ChunkStage& in, const ChunkStage& compute, const ChunkStage& out);

 private:
  void loop();
  void exchanges();  // the worker's side of run()

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool busy_ = false;  // a run() is in progress on the worker's side
  // The phase in progress; written by run() before the worker is woken.
  int chunks_ = 0;
  const ChunkStage* in_ = nullptr;
  const ChunkStage* out_ = nullptr;
  int exchanged_in_ = 0;  // chunks whose `in` is done
  int computed_ = 0;      // chunks whose `compute` is done
  bool failed_ = false;
  Status exchange_status_;
  std::thread thread_;
};

}  // namespace tutel::graphs
