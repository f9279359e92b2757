/* Compiled as C: tutel/client.h must stay plain C (no C++ types, no default arguments). */
#include "tutel/client.h"

#include <stddef.h>

int tutel_c_header_check(void);

int tutel_c_header_check(void) {
  tutel_ticket ticket = {0, 0};
  tutel_forward_info info = {0.f, 0, 0, 0};
  tutel_connect_options options = {0};
  options.struct_size = sizeof options;
  options.request_timeout_ms = 1000;
  (void)info;
  /* A NULL path is refused before the options are read. */
  if (tutel_connect_with_options(NULL, &options) != NULL) return 1;
  if (tutel_wait_for(NULL, ticket, 0, NULL) != TUTEL_E_INVALID_ARGUMENT) return 1;
  /* A NULL client is refused with TUTEL_E_INVALID_ARGUMENT, from C as from C++. */
  return tutel_wait(NULL, ticket, NULL) == TUTEL_E_INVALID_ARGUMENT &&
                 tutel_last_error_code() == TUTEL_E_INVALID_ARGUMENT
             ? 0
             : 1;
}
