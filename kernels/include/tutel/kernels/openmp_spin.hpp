// How long the CPU backend's idle OpenMP threads spin before they sleep, for the executables that
// compute (tuteld, tutel-bench, tutel-layer).
//
// libgomp's own default, where neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY is set, is 300 000
// rounds (about 6 ms on the development machine) after every parallel region, per thread of the
// team. On a node where other processes want the cores too (the trainers beside the daemon, a
// build, another daemon) those spinning threads take the time slices their team's late members
// wait for, and every region then waits for a slice: a small forward on two threads took 160 ms
// where it takes 8 ms (docs/decisions.md, "OpenMP's idle threads spin briefly"). A short spin
// still bridges the gaps between the regions of one step, which is what the spin is for.
#pragma once

#include "tutel/core/status.hpp"

namespace tutel {

// The spin, in libgomp's rounds (GOMP_SPINCOUNT's unit: one pause instruction and a load each,
// ~20 ns here: about 60 µs), that the executables take when the environment does not choose one.
inline constexpr const char* kOpenmpSpinCount = "3000";

// Where the environment sets neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY, sets GOMP_SPINCOUNT to
// kOpenmpSpinCount and executes this program again with the same arguments (by its own path,
// else /proc/self/exe; the pid stays, the process is named after its file): libgomp reads it once, in
// its own initialiser, before main. Returns only where there was nothing to do, or with the
// reason it could not (a program started through the dynamic loader or under valgrind, which
// the exec would not run again as it was; an exec that failed): the process then runs with
// libgomp's default; say so and go on. Call it first in main, before any thread exists: the exec
// ends every thread, keeps the signal mask and the ignored signals, and resets handled ones.
// Processes started later inherit the variable.
Status bound_openmp_spin(char** argv);

}  // namespace tutel
