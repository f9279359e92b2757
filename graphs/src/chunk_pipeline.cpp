#include "chunk_pipeline.hpp"

#include <cassert>
#include <exception>
#include <string>

namespace tutel::graphs {
namespace {

// A stage's Status, also when it throws (std::bad_alloc building a message): no exception may
// leave a stage, on the worker (std::terminate) or on the caller (the worker would still run
// the caller's stages while they are destroyed).
Status call(const ChunkStage& stage, int chunk) noexcept {
  try {
    return stage(chunk);
  } catch (const std::exception& e) {
    return Status::Internal(std::string("a pipelined stage threw: ") + e.what());
  } catch (...) {
    return Status::Internal("a pipelined stage threw");
  }
}

}  // namespace

Status run_chunks_in_order(int chunks, const ChunkStage& in, const ChunkStage& compute,
                           const ChunkStage& out) {
  TUTEL_RETURN_IF_ERROR(in(0));
  for (int j = 0; j < chunks; ++j) {
    if (j + 1 < chunks) TUTEL_RETURN_IF_ERROR(in(j + 1));
    TUTEL_RETURN_IF_ERROR(compute(j));
    TUTEL_RETURN_IF_ERROR(out(j));
  }
  return Status::OK();
}

ExchangeWorker::ExchangeWorker() : thread_([this] { loop(); }) {}

ExchangeWorker::~ExchangeWorker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void ExchangeWorker::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || in_ != nullptr; });
    if (stop_) return;
    lock.unlock();
    exchanges();
    lock.lock();
    in_ = out_ = nullptr;
    busy_ = false;
    cv_.notify_all();
  }
}

void ExchangeWorker::exchanges() {
  // Runs one exchange unless the phase already failed; records the first failure.
  auto exchange = [&](const ChunkStage& stage, int j, int* done) -> bool {
    Status st = call(stage, j);
    std::lock_guard<std::mutex> lock(mu_);
    if (!st.ok()) {
      if (!failed_) exchange_status_ = std::move(st);
      failed_ = true;
    } else if (done) {
      ++*done;
    }
    cv_.notify_all();
    return !failed_;
  };
  if (!exchange(*in_, 0, &exchanged_in_)) return;
  for (int j = 0; j < chunks_; ++j) {
    if (j + 1 < chunks_ && !exchange(*in_, j + 1, &exchanged_in_)) return;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return failed_ || stop_ || computed_ > j; });
      if (failed_ || stop_) return;
    }
    if (!exchange(*out_, j, nullptr)) return;
  }
}

Status ExchangeWorker::run(int chunks, const ChunkStage& in, const ChunkStage& compute,
                           const ChunkStage& out) {
  assert(chunks >= 1);
  {
    std::lock_guard<std::mutex> lock(mu_);
    assert(!busy_ && "one pipelined phase at a time");
    chunks_ = chunks;
    in_ = &in;
    out_ = &out;
    exchanged_in_ = computed_ = 0;
    failed_ = false;
    exchange_status_ = Status::OK();
    busy_ = true;
  }
  cv_.notify_all();
  Status compute_status;
  for (int j = 0; j < chunks; ++j) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return failed_ || exchanged_in_ > j; });
      if (failed_) break;
    }
    compute_status = call(compute, j);
    std::lock_guard<std::mutex> lock(mu_);
    if (!compute_status.ok())
      failed_ = true;
    else
      ++computed_;
    cv_.notify_all();
    if (failed_) break;
  }
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !busy_; });
  // The exchange's failure came first whenever there is one: a compute that failed afterwards
  // only saw its inputs missing.
  if (!exchange_status_.ok()) return exchange_status_;
  return compute_status;
}

}  // namespace tutel::graphs
