// Shared by the tool tests: a temporary directory, safetensors files built from host values,
// and the tutel-layer binary run as a child process with its stderr captured.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "tutel/core/dtype.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/core/tensor.hpp"

extern char** environ;

namespace tutel::testing {

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "tutel_layer_test.XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
      ADD_FAILURE() << "mkdtemp failed: " << std::strerror(errno);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// A tensor to write, holding its own bytes.
struct FileTensor {
  std::string name;
  DType dtype;
  Shape shape;
  std::vector<unsigned char> bytes;

  static FileTensor of(std::string name, Shape shape, const std::vector<double>& v,
                       DType dtype = DType::kF32) {
    FileTensor t{std::move(name), dtype, shape, {}};
    t.bytes.resize(v.size() * dtype_size(dtype));
    for (size_t i = 0; i < v.size(); ++i) {
      if (dtype == DType::kF32) {
        const float f = static_cast<float>(v[i]);
        std::memcpy(&t.bytes[i * 4], &f, 4);
      } else if (dtype == DType::kF64) {
        std::memcpy(&t.bytes[i * 8], &v[i], 8);
      } else if (dtype == DType::kBF16) {
        const uint16_t h = f32_to_bf16(static_cast<float>(v[i]));
        std::memcpy(&t.bytes[i * 2], &h, 2);
      } else if (dtype == DType::kI32) {
        const int32_t n = static_cast<int32_t>(v[i]);
        std::memcpy(&t.bytes[i * 4], &n, 4);
      }
    }
    return t;
  }
};

using TensorList = std::vector<FileTensor>;

inline void write_file(const std::string& path, const TensorList& tensors) {
  std::vector<SafetensorsEntry> entries;
  for (const FileTensor& t : tensors) entries.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  const Status s = write_safetensors(path, entries);
  ASSERT_TRUE(s.ok()) << s;
}

inline TensorList::iterator find_tensor(TensorList& list, const std::string& name) {
  return std::find_if(list.begin(), list.end(),
                      [&](const FileTensor& t) { return t.name == name; });
}

struct ToolRun {
  int exit_code = -1;  // 128 + signal when the tool died of one
  std::string err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `binary` with stdout and stderr sent to files in `dir`.
inline ToolRun run_binary(const TempDir& dir, const std::string& binary, const std::vector<std::string>& args) {
  const std::string out_path = dir.file("stdout.txt"), err_path = dir.file("stderr.txt");
  std::vector<std::string> argv_storage{binary};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ToolRun run;
  if (rc != 0) {
    ADD_FAILURE() << "cannot start " << argv[0] << ": " << std::strerror(rc);
    return run;
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  run.err = slurp(err_path);
  return run;
}

// Runs the built tutel-layer.
inline ToolRun run_tool(const TempDir& dir, const std::vector<std::string>& args) {
  return run_binary(dir, TUTEL_LAYER_BIN, args);
}

inline std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name) {
  const SafetensorsTensor* t = f.find(name);
  if (!t) {
    ADD_FAILURE() << "output has no tensor '" << name << "'";
    return {};
  }
  EXPECT_EQ(t->dtype, DType::kF32) << name;
  std::vector<float> v(t->shape.numel());
  std::memcpy(v.data(), t->data, v.size() * 4);
  return v;
}

inline int64_t read_i64(const SafetensorsFile& f, const std::string& name) {
  const SafetensorsTensor* t = f.find(name);
  if (!t || t->dtype != DType::kI64 || t->shape.numel() != 1) {
    ADD_FAILURE() << "output has no i64 [1] tensor '" << name << "'";
    return -1;
  }
  int64_t v;
  std::memcpy(&v, t->data, 8);
  return v;
}

}  // namespace tutel::testing
