// Counts its calls (like examples/counter): each call increments `count`
// atomically and answers with the new value as decimal digits.
//
// role.h comes from `wit-bindgen c wit --world role` (see
// docs/writing-roles.md). Ownership follows the generated code: the request
// is ours to free; the response and an error's string are freed by the
// bindings after the host has read them, so both must come from malloc (the
// strings of errors returned by imports already do).

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "role.h"

bool exports_rolehost_state_handler_handle(role_list_u8_t *request, role_list_u8_t *ret,
                                           exports_rolehost_state_handler_error_t *err) {
    role_list_u8_free(request); // the counter ignores its request

    role_string_t own, key;
    role_string_set(&own, ""); // "" is the role's own namespace
    role_string_set(&key, "count");

    rolehost_state_kv_own_bucket_t bucket;
    if (!rolehost_state_kv_static_bucket_open(&own, &bucket, err)) {
        return false;
    }
    int64_t count;
    bool ok = rolehost_state_atomics_increment(rolehost_state_kv_borrow_bucket(bucket), &key, 1, &count, err);
    rolehost_state_kv_bucket_drop_own(bucket);
    if (!ok) {
        return false;
    }

    char digits[24];
    int len = snprintf(digits, sizeof digits, "%lld", (long long)count);
    ret->ptr = malloc((size_t)len);
    if (ret->ptr == NULL) {
        abort(); // out of memory: trap
    }
    memcpy(ret->ptr, digits, (size_t)len);
    ret->len = (size_t)len;
    return true;
}
